package image

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"

	securejoin "github.com/cyphar/filepath-securejoin"
	"golang.org/x/sys/unix"
)

// OCI whiteout markers (image-spec, layer.md).
const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
)

// ApplyLayer unpacks one uncompressed layer tarball onto root, which holds
// the layers below it, as overlayfs would show them: a ".wh.NAME" entry
// deletes NAME from the lower layers, ".wh..wh..opq" hides every lower entry
// of its directory, and everything else is created with its mode, owner,
// times, xattrs, links and device numbers. It must run as root to set
// ownership and make device nodes.
//
// Paths are resolved inside root (symlinks included), so a hostile layer
// cannot write outside it through "..", absolute names or a planted symlink.
// u, if not nil, counts what the image unpacks (its layers share it): an
// entry past its limits fails with ErrTooLarge before anything of it is
// written, so that a small compressed layer cannot fill the host's disk
// or inode table.
func ApplyLayer(root string, layer io.Reader, u *Usage) error {
	tr := tar.NewReader(layer)
	// Entries this layer wrote: an opaque marker may come after entries of
	// the same layer in the same directory, and must not delete those.
	written := map[string]bool{}
	var dirs []*tar.Header
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read layer: %w", err)
		}
		if err := u.take(hdr); err != nil {
			return err
		}
		rel := cleanPath(hdr.Name)
		if rel == "" {
			continue // the root itself
		}
		dir, base := path.Split(rel)
		parent, err := securejoin.SecureJoin(root, dir)
		if err != nil {
			return fmt.Errorf("%s: %w", hdr.Name, err)
		}
		if base == opaqueMarker {
			if err := clearOpaque(parent, path.Clean("/"+dir), written); err != nil {
				return err
			}
			continue
		}
		if name, ok := strings.CutPrefix(base, whiteoutPrefix); ok {
			if err := os.RemoveAll(filepath.Join(parent, name)); err != nil {
				return fmt.Errorf("whiteout %s: %w", rel, err)
			}
			continue
		}
		if err := os.MkdirAll(parent, 0o755); err != nil {
			return fmt.Errorf("%s: %w", hdr.Name, err)
		}
		target := filepath.Join(parent, base)
		written["/"+rel] = true
		if err := applyEntry(root, target, hdr, tr); err != nil {
			return fmt.Errorf("%s: %w", hdr.Name, err)
		}
		if hdr.Typeflag == tar.TypeDir {
			dirs = append(dirs, hdr)
		}
	}
	// Directory times last: creating their children changed them.
	for _, hdr := range dirs {
		p, err := securejoin.SecureJoin(root, cleanPath(hdr.Name))
		if err == nil {
			_ = setTimes(p, hdr)
		}
	}
	return nil
}

// Limits bound what an image unpacks to: bytes of file content and
// entries, over all of its layers.
type Limits struct {
	Bytes   int64
	Entries int64
}

// DefaultLimits are a Store's unless it is given others: far past any
// image a sandbox should boot, far below what fills a host.
var DefaultLimits = Limits{Bytes: 8 << 30, Entries: 1 << 20}

// ErrTooLarge is an image that unpacks past its Limits.
var ErrTooLarge = errors.New("image too large")

// Usage is what an image's layers have unpacked so far, against its
// limits.
type Usage struct {
	Limits
	bytes, entries int64
}

// take counts hdr; past the limits, it is an ErrTooLarge.
func (u *Usage) take(hdr *tar.Header) error {
	if u == nil {
		return nil
	}
	if u.entries++; u.entries > u.Entries {
		return fmt.Errorf("%w: it unpacks to more than %d files, the limit", ErrTooLarge, u.Entries)
	}
	if hdr.Typeflag == tar.TypeReg || hdr.Typeflag == tar.TypeRegA {
		if hdr.Size < 0 || hdr.Size > u.Bytes-u.bytes {
			return fmt.Errorf("%w: it unpacks to more than %d bytes, the limit (at %s)", ErrTooLarge, u.Bytes, hdr.Name)
		}
		u.bytes += hdr.Size
	}
	return nil
}

// cleanPath turns a tar entry name into a clean relative path ("" for root).
func cleanPath(name string) string {
	p := path.Clean("/" + name)
	return strings.TrimPrefix(p, "/")
}

// clearOpaque removes what lower layers put in dir, keeping what this layer
// wrote there.
func clearOpaque(dir, rel string, written map[string]bool) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("opaque %s: %w", rel, err)
	}
	for _, e := range entries {
		if written[path.Join(rel, e.Name())] {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return fmt.Errorf("opaque %s: %w", rel, err)
		}
	}
	return nil
}

func applyEntry(root, target string, hdr *tar.Header, r io.Reader) error {
	fi, err := os.Lstat(target)
	exists := err == nil
	// Replace whatever is there, except a directory by a directory (its
	// contents from lower layers stay).
	if exists && !(fi.IsDir() && hdr.Typeflag == tar.TypeDir) {
		if err := os.RemoveAll(target); err != nil {
			return err
		}
	}
	mode := uint32(hdr.Mode & 0o7777)
	switch hdr.Typeflag {
	case tar.TypeDir:
		if !exists || !fi.IsDir() {
			if err := os.Mkdir(target, 0o700); err != nil {
				return err
			}
		}
	case tar.TypeReg, tar.TypeRegA:
		f, err := os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		_, err = io.Copy(f, r)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	case tar.TypeSymlink:
		if err := os.Symlink(hdr.Linkname, target); err != nil {
			return err
		}
	case tar.TypeLink:
		ldir, lbase := path.Split(cleanPath(hdr.Linkname))
		lparent, err := securejoin.SecureJoin(root, ldir)
		if err != nil {
			return err
		}
		// A hard link shares the inode: its metadata is the target's.
		return os.Link(filepath.Join(lparent, lbase), target)
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		kind := map[byte]uint32{tar.TypeChar: unix.S_IFCHR, tar.TypeBlock: unix.S_IFBLK, tar.TypeFifo: unix.S_IFIFO}[hdr.Typeflag]
		dev := unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
		if err := unix.Mknod(target, kind|mode, int(dev)); err != nil {
			return err
		}
	default:
		return nil // pax/gnu extension headers are consumed by archive/tar
	}
	if err := os.Lchown(target, hdr.Uid, hdr.Gid); err != nil {
		return err
	}
	for k, v := range hdr.PAXRecords {
		if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			if err := unix.Lsetxattr(target, name, []byte(v), 0); err != nil {
				return fmt.Errorf("xattr %s: %w", name, err)
			}
		}
	}
	if hdr.Typeflag != tar.TypeSymlink {
		// After chown, which clears set-id bits.
		if err := unix.Chmod(target, mode); err != nil {
			return err
		}
	}
	return setTimes(target, hdr)
}

func setTimes(p string, hdr *tar.Header) error {
	ts := []unix.Timespec{unix.NsecToTimespec(hdr.ModTime.UnixNano()), unix.NsecToTimespec(hdr.ModTime.UnixNano())}
	if !hdr.AccessTime.IsZero() {
		ts[0] = unix.NsecToTimespec(hdr.AccessTime.UnixNano())
	}
	return unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW)
}
