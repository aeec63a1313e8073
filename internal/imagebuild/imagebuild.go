// Package imagebuild builds small OCI images from files on this host, with
// no downloads: Debian's busybox-static as a base, plus whatever files,
// whiteouts and config a test or the demo needs. It is how hearth's tests and
// `make demo` get real images to push to a real registry.
package imagebuild

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// BusyboxPath is where Debian's busybox-static installs its binary.
const BusyboxPath = "/bin/busybox"

// File is one layer entry.
type File struct {
	Path     string
	Mode     int64 // permission bits; the type comes from the other fields
	Body     []byte
	Dir      bool
	Symlink  string // target, for a symlink
	Hardlink string // target path in the image, for a hard link
	UID, GID int
	Xattrs   map[string]string
	Char     *[2]int64 // major, minor, for a character device
}

// Whiteout deletes path from the layers below.
func Whiteout(path string) File {
	i := strings.LastIndexByte(path, '/')
	return File{Path: path[:i+1] + ".wh." + path[i+1:], Mode: 0o644}
}

// Opaque hides everything lower layers put in dir.
func Opaque(dir string) File {
	return File{Path: strings.TrimSuffix(dir, "/") + "/.wh..wh..opq", Mode: 0o644}
}

// Tar writes files as an uncompressed layer tarball.
func Tar(files []File) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Unix(1700000000, 0)
	for _, f := range files {
		h := &tar.Header{Name: strings.TrimPrefix(f.Path, "/"), Mode: f.Mode, Uid: f.UID, Gid: f.GID, ModTime: mtime, Format: tar.FormatPAX}
		switch {
		case f.Dir:
			h.Typeflag, h.Name = tar.TypeDir, h.Name+"/"
		case f.Symlink != "":
			h.Typeflag, h.Linkname = tar.TypeSymlink, f.Symlink
		case f.Hardlink != "":
			h.Typeflag, h.Linkname = tar.TypeLink, strings.TrimPrefix(f.Hardlink, "/")
		case f.Char != nil:
			h.Typeflag, h.Devmajor, h.Devminor = tar.TypeChar, f.Char[0], f.Char[1]
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.Body))
		}
		for k, v := range f.Xattrs {
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("%s: %w", f.Path, err)
		}
		if _, err := tw.Write(f.Body); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Layer makes a gzip-compressed image layer of files.
func Layer(files []File) (v1.Layer, error) {
	b, err := Tar(files)
	if err != nil {
		return nil, err
	}
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	}, tarball.WithMediaType(types.OCILayer))
}

// Busybox returns the files of a minimal userland: busybox-static with a
// link per applet, /etc/passwd and /etc/group with root, nobody and a user
// "app" (1000:1000, also in group "staff"), and the usual directories.
func Busybox() ([]File, error) {
	bin, err := os.ReadFile(BusyboxPath)
	if err != nil {
		return nil, fmt.Errorf("%w (install it with: apt-get install busybox-static)", err)
	}
	list, err := exec.Command(BusyboxPath, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("busybox --list: %w", err)
	}
	files := []File{
		{Path: "/bin", Dir: true, Mode: 0o755},
		{Path: "/bin/busybox", Mode: 0o755, Body: bin},
		{Path: "/etc", Dir: true, Mode: 0o755},
		{Path: "/etc/passwd", Mode: 0o644, Body: []byte("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")},
		{Path: "/etc/group", Mode: 0o644, Body: []byte("root:x:0:\nstaff:x:50:app\napp:x:1000:\nnogroup:x:65534:\n")},
		{Path: "/root", Dir: true, Mode: 0o700},
		{Path: "/home", Dir: true, Mode: 0o755},
		{Path: "/home/app", Dir: true, Mode: 0o755, UID: 1000, GID: 1000},
		{Path: "/tmp", Dir: true, Mode: 0o1777},
		{Path: "/usr", Dir: true, Mode: 0o755},
		{Path: "/usr/bin", Dir: true, Mode: 0o755},
	}
	for _, applet := range strings.Fields(string(list)) {
		if applet == "busybox" {
			continue
		}
		files = append(files, File{Path: "/bin/" + applet, Symlink: "busybox", Mode: 0o777})
	}
	return files, nil
}

// Image builds an image of the given layers (bottom first) and config.
func Image(cfg v1.Config, layers ...[]File) (v1.Image, error) {
	// OCI media types throughout: skopeo's oci: transport wants them.
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for _, files := range layers {
		l, err := Layer(files)
		if err != nil {
			return nil, err
		}
		if img, err = mutate.AppendLayers(img, l); err != nil {
			return nil, err
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Config = cfg
	return mutate.ConfigFile(img, cf)
}

// WriteLayout writes img into an OCI image layout at dir, tagged tag.
func WriteLayout(dir, tag string, img v1.Image) error {
	p, err := layout.FromPath(dir)
	if err != nil {
		if p, err = layout.Write(dir, empty.Index); err != nil {
			return err
		}
	}
	return p.ReplaceImage(img, func(d v1.Descriptor) bool {
		return d.Annotations["org.opencontainers.image.ref.name"] == tag
	}, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": tag}))
}
