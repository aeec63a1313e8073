package cli

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseMiB(t *testing.T) {
	for in, want := range map[string]int{"256M": 256, "256m": 256, "1G": 1024, "1GiB": 1024, "1gb": 1024, "512MiB": 512, "2097152": 2, "1.5G": 1536} {
		got, err := parseMiB("--memory", in)
		if err != nil || got != want {
			t.Errorf("parseMiB(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "lots", "-1G", "G"} {
		if _, err := parseMiB("--memory", bad); err == nil {
			t.Errorf("parseMiB(%q) accepted", bad)
		}
	}
}

func TestCollectEnv(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "env")
	if err := os.WriteFile(file, []byte("# comment\nA=from-file\n\nB=2\nHEARTH_TEST_PASS\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("HEARTH_TEST_PASS", "passed")
	got, err := collectEnv([]string{file}, []string{"A=from-flag", "HEARTH_TEST_UNSET_VAR"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"A=from-file", "B=2", "HEARTH_TEST_PASS=passed", "A=from-flag"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %q, want %q", got, want)
	}
	if _, err := collectEnv(nil, []string{"=x"}); err == nil {
		t.Error("accepted =x")
	}
	if _, err := collectEnv([]string{filepath.Join(dir, "missing")}, nil); err == nil {
		t.Error("accepted a missing env file")
	}
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"run", "--help"}, {"image", "--help"}, {"image", "pull", "--help"}, {"version"}} {
		var out, errb strings.Builder
		if code := Main(args, strings.NewReader(""), &out, &errb); code != 0 {
			t.Errorf("%v: exit %d: %s", args, code, errb.String())
		}
		if out.Len() == 0 {
			t.Errorf("%v printed nothing", args)
		}
	}
	// hearth bench runs hearth-bench, and says where it looked without it.
	var bout, berr strings.Builder
	t.Setenv("HEARTH_BENCH", filepath.Join(t.TempDir(), "no-hearth-bench"))
	if code := Main([]string{"bench", "boot"}, strings.NewReader(""), &bout, &berr); code != ExitHearth || !strings.Contains(berr.String(), "hearth-bench") {
		t.Errorf("bench without hearth-bench: %d %q", code, berr.String())
	}
	// hearth up runs hearthd, and says where it looked without it.
	t.Setenv("HEARTH_HEARTHD", "")
	t.Setenv("PATH", t.TempDir())
	var uout, uerr strings.Builder
	if code := Main([]string{"up", "--data-dir", t.TempDir()}, strings.NewReader(""), &uout, &uerr); code != ExitHearth || !strings.Contains(uerr.String(), "hearthd not found") {
		t.Errorf("up without hearthd: %d %q", code, uerr.String())
	}
	var out, errb strings.Builder
	if code := Main([]string{"run"}, strings.NewReader(""), &out, &errb); code != ExitHearth || !strings.Contains(errb.String(), "give an IMAGE to run, or --template, --snapshot or --pool") {
		t.Errorf("run without image: %d %q", code, errb.String())
	}
}
