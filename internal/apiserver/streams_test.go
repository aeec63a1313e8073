package apiserver

import (
	"context"
	"testing"

	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizer"

	"hearth.dev/hearth/internal/pki"
)

func TestParseStreamPath(t *testing.T) {
	for _, tc := range []struct {
		path          string
		ns, name, sub string
		ok            bool
	}{
		{"/apis/hearth.dev/v1alpha1/namespaces/default/sandboxes/job-1/exec", "default", "job-1", "exec", true},
		{"/apis/hearth.dev/v1alpha1/namespaces/x/sandboxes/y/log", "x", "y", "log", true},
		{"/apis/hearth.dev/v1alpha1/namespaces/x/sandboxes/y/attach", "x", "y", "attach", true},
		{"/apis/hearth.dev/v1alpha1/namespaces/x/sandboxes/y/status", "", "", "", false},
		{"/apis/hearth.dev/v1alpha1/namespaces/x/sandboxes/y", "", "", "", false},
		{"/apis/hearth.dev/v1alpha1/namespaces/x/hosts/y/exec", "", "", "", false},
		{"/api/v1/namespaces/x/pods/y/exec", "", "", "", false},
		{"/apis/hearth.dev/v1alpha1/namespaces//sandboxes/y/exec", "", "", "", false},
	} {
		ns, name, sub, ok := parseStreamPath(tc.path)
		if ns != tc.ns || name != tc.name || sub != tc.sub || ok != tc.ok {
			t.Errorf("%s: got %q %q %q %v", tc.path, ns, name, sub, ok)
		}
	}
}

func TestAuthorize(t *testing.T) {
	for _, tc := range []struct {
		groups []string
		want   authorizer.Decision
	}{
		{[]string{pki.GroupAdmin}, authorizer.DecisionAllow},
		{[]string{pki.GroupNodes}, authorizer.DecisionAllow},
		{[]string{"system:authenticated"}, authorizer.DecisionDeny},
		{nil, authorizer.DecisionDeny},
	} {
		d, _, err := authorize(context.Background(), authorizer.AttributesRecord{User: &user.DefaultInfo{Name: "u", Groups: tc.groups}})
		if err != nil || d != tc.want {
			t.Errorf("groups %v: %v, %v; want %v", tc.groups, d, err, tc.want)
		}
	}
}
