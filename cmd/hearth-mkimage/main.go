// Command hearth-mkimage writes a small OCI image built from Debian's
// busybox-static (no downloads) into an OCI layout, for the demo and for
// trying hearth on a machine with no registry access:
//
//	hearth-mkimage -o /tmp/hearth-demo -t latest
//	hearth run oci:/tmp/hearth-demo:latest -- sh -c 'echo hello'
//
// Push it to a registry with: skopeo copy oci:/tmp/hearth-demo:latest docker://HOST/NAME:TAG
package main

import (
	"flag"
	"fmt"
	"os"
	"path"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"hearth.dev/hearth/internal/imagebuild"
)

func main() {
	out := flag.String("o", "", "OCI layout directory to write (required)")
	tag := flag.String("t", "latest", "tag within the layout")
	var adds multi
	flag.Var(&adds, "add", "add a host file to the image as SRC:DST (repeatable)")
	flag.Parse()
	if *out == "" {
		flag.Usage()
		os.Exit(2)
	}
	if err := build(*out, *tag, adds); err != nil {
		fmt.Fprintf(os.Stderr, "hearth-mkimage: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("oci:%s:%s\n", *out, *tag)
}

func build(out, tag string, adds []string) error {
	base, err := imagebuild.Busybox()
	if err != nil {
		return err
	}
	var extra []imagebuild.File
	for _, a := range adds {
		src, dst, ok := strings.Cut(a, ":")
		if !ok {
			return fmt.Errorf("--add %q: want SRC:DST", a)
		}
		b, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		extra = append(extra, imagebuild.File{Path: path.Clean("/" + dst), Mode: 0o755, Body: b})
	}
	img, err := imagebuild.Image(v1.Config{Cmd: []string{"sh"}, Env: []string{"PATH=/usr/local/bin:/usr/bin:/bin"}}, base, extra)
	if err != nil {
		return err
	}
	return imagebuild.WriteLayout(out, tag, img)
}

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }
