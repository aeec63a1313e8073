package node

import (
	"reflect"
	"testing"

	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/utils/ptr"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/sandbox"
)

func TestSandboxSpec(t *testing.T) {
	sb := &v1alpha1.Sandbox{Spec: v1alpha1.SandboxSpec{
		Image: "img", Command: []string{"sh", "-c"}, Args: []string{"echo hi"},
		Env:       []v1alpha1.EnvVar{{Name: "A", Value: "1"}, {Name: "B"}},
		Resources: v1alpha1.Resources{CPU: ptr.To(resource.MustParse("1500m")), Memory: ptr.To(resource.MustParse("512Mi"))},
		User:      "1000", WorkingDir: "/w", Stdin: true, TTY: true,
	}}
	sb.Name = "job"
	got := sandboxSpec(sb)
	if err := got.Validate(); err != nil {
		t.Fatal(err)
	}
	want := sandbox.Spec{Image: "img", Entrypoint: []string{"sh", "-c"}, Command: []string{"echo hi"}, Env: []string{"A=1", "B="},
		WorkingDir: "/w", User: "1000", TTY: true, Stdin: true, CPUs: 2, MemoryMiB: 512, DiskMiB: 1024, Name: "job", Snapshottable: true}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("sandboxSpec =\n%+v\nwant\n%+v", got, want)
	}
	sb.Spec.Resources.Memory = ptr.To(resource.MustParse("16Mi"))
	if s := sandboxSpec(sb); s.Validate() == nil {
		t.Error("16Mi of memory accepted")
	}
}

func TestRestarts(t *testing.T) {
	for _, tc := range []struct {
		policy v1alpha1.RestartPolicy
		code   int
		want   bool
	}{
		{v1alpha1.RestartNever, 1, false},
		{v1alpha1.RestartNever, 0, false},
		{v1alpha1.RestartOnFailure, 1, true},
		{v1alpha1.RestartOnFailure, 0, false},
		{v1alpha1.RestartAlways, 0, true},
		{"", 1, false},
	} {
		if got := restarts(tc.policy, tc.code); got != tc.want {
			t.Errorf("restarts(%s, %d) = %v", tc.policy, tc.code, got)
		}
	}
}
