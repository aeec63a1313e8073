package agent

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
)

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// completeEnv adds what docker adds to a workload's environment when the
// image and the user left it out: PATH, HOSTNAME, HOME and, with a TTY, TERM.
func completeEnv(env []string, hostname, home string, tty bool) []string {
	have := map[string]bool{}
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		have[k] = true
	}
	add := func(k, v string) {
		if !have[k] {
			env = append(env, k+"="+v)
		}
	}
	add("PATH", defaultPath)
	if hostname != "" {
		add("HOSTNAME", hostname)
	}
	add("HOME", home)
	if tty {
		add("TERM", "xterm")
	}
	return env
}

func getenv(env []string, key string) string {
	for i := len(env) - 1; i >= 0; i-- {
		if k, v, ok := strings.Cut(env[i], "="); ok && k == key {
			return v
		}
	}
	return ""
}

var (
	errNotFound      = errors.New("executable file not found in $PATH")
	errNotExecutable = errors.New("permission denied")
)

// lookPath finds name as a shell would, in the workload's PATH (not the
// agent's), with relative names and PATH entries taken relative to the
// working directory dir. It tells "not found" (exit 127) from "found but not
// executable" (exit 126), as docker does.
func lookPath(name, path, dir string) (string, error) {
	check := func(p string) error {
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		fi, err := os.Stat(p)
		if err != nil {
			return errNotFound
		}
		if fi.IsDir() || fi.Mode()&0o111 == 0 {
			return errNotExecutable
		}
		return nil
	}
	if strings.Contains(name, "/") {
		return name, check(name)
	}
	if path == "" {
		path = defaultPath
	}
	firstErr := errNotFound
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, name)
		err := check(p)
		if err == nil {
			return p, nil
		}
		if errors.Is(err, errNotExecutable) && errors.Is(firstErr, errNotFound) {
			firstErr = err
		}
	}
	return "", firstErr
}
