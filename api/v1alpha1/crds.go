package v1alpha1

import (
	"embed"
	"io/fs"
)

//go:embed crds/*.yaml
var crdFiles embed.FS

// CRDs returns the CustomResourceDefinitions of the API as YAML documents,
// generated from these types by `make generate`.
func CRDs() ([][]byte, error) {
	names, err := fs.Glob(crdFiles, "crds/*.yaml")
	if err != nil {
		return nil, err
	}
	var out [][]byte
	for _, n := range names {
		b, err := crdFiles.ReadFile(n)
		if err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	return out, nil
}

// StreamSubresources are the Sandbox subresources that the API server
// proxies to the node agent running the sandbox, as kube-apiserver proxies
// pods/exec, pods/attach and pods/log to the kubelet.
var StreamSubresources = []string{"exec", "attach", "log"}

// NodeStreamPath is where a node agent serves a stream subresource.
func NodeStreamPath(namespace, name, subresource string) string {
	return "/sandboxes/" + namespace + "/" + name + "/" + subresource
}
