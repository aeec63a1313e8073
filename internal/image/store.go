// Package image turns OCI images into what a hearth guest boots from: one
// read-only erofs filesystem per manifest digest, built once on the host and
// shared by every VM that runs the image.
//
// Why erofs rather than ext4: it is read-only by design (the guest cannot
// change a shared image even by writing to the block device's filesystem
// structures), it needs no size guessed up front, mkfs.erofs builds it from a
// directory in one pass preserving owners, modes, xattrs, hard links and
// device nodes, and it is compact. The writable layer is a separate ext4 disk
// per sandbox, joined with overlayfs in the guest.
package image

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/klauspost/compress/zstd"
	"github.com/schollz/progressbar/v3"
	"golang.org/x/sys/unix"
)

// PullPolicy says when to contact the image's source.
type PullPolicy string

// Pull policies, as in docker run --pull.
const (
	PullMissing PullPolicy = "missing" // use the local copy of a registry image if there is one
	PullAlways  PullPolicy = "always"
	PullNever   PullPolicy = "never"
)

// ParsePullPolicy checks a --pull value.
func ParsePullPolicy(s string) (PullPolicy, error) {
	switch p := PullPolicy(s); p {
	case PullMissing, PullAlways, PullNever:
		return p, nil
	case "":
		return PullMissing, nil
	}
	return "", fmt.Errorf("--pull %q: want missing, always or never", s)
}

// Store keeps converted images under Dir:
//
//	blobs/<hex>/rootfs.erofs, config.json  one per manifest digest
//	refs.json                              reference → digest
//	locks/<hex>.lock                       held while converting or in use
//	tmp/                                   work in progress
type Store struct {
	Dir    string
	Source SourceOptions
	// Progress, if set, receives progress bars (a terminal).
	Progress io.Writer
	Log      *slog.Logger
	// Limits bound what one image unpacks to (DefaultLimits if zero).
	Limits Limits
}

// Image is a converted image, ready to boot.
type Image struct {
	Ref       string
	Digest    string // sha256:...
	RootFS    string // the erofs file
	Config    v1.Config
	Size      int64 // bytes of the erofs file
	Converted bool  // this call did the conversion
}

// Get returns the converted image for ref, pulling and converting it if the
// store does not hold it. Concurrent calls for the same image convert once.
func (s *Store) Get(ctx context.Context, ref string, policy PullPolicy) (*Image, error) {
	ref = canonicalRef(ref)
	remoteRef := !IsLocal(ref)
	if remoteRef && policy != PullAlways {
		if dgst, ok := s.lookupRef(ref); ok {
			if img, err := s.load(ref, dgst); err == nil {
				err := s.mayUse(ctx, ref, dgst)
				if err == nil {
					return img, nil
				}
				if !errors.Is(err, errMoved) {
					return nil, err
				}
				// The tag moved: what it names now is pulled below.
			}
		}
		if policy == PullNever {
			return nil, fmt.Errorf("%w: %s is not in the local store and --pull=never", ErrNotFound, ref)
		}
	}
	src, err := Open(ctx, ref, s.Source)
	if err != nil {
		return nil, err
	}
	d, err := src.Digest()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ref, err)
	}
	img, err := s.convert(ctx, ref, d.String(), src)
	if err != nil {
		return nil, err
	}
	if remoteRef {
		if err := s.claim(ctx, ref, img, src); err != nil {
			return nil, err
		}
	}
	return img, s.setRef(ref, img.Digest)
}

// In an image's blob directory, publicFile says that its blobs came down
// without credentials, originsFile names the repositories (one a line)
// that served it.
const (
	publicFile  = "public"
	originsFile = "origins"
)

// claim records that ref's repository serves img. An image held here is
// found by its manifest's digest, which anyone who has seen the manifest
// can serve: for a tenant's pull (Source.Guard) of an image first pulled
// from another repository and not public, the layers come down again
// from ref's registry and must match their digests, so that a registry
// that knows a private image's manifest does not get its contents.
func (s *Store) claim(ctx context.Context, ref string, img *Image, src v1.Image) error {
	dir := s.blobDir(img.Digest)
	repo := ref
	if r, err := ParseReference(ref, s.Source); err == nil {
		repo = r.Context().Name()
	}
	_, err := os.Stat(filepath.Join(dir, publicFile))
	public := err == nil
	fetched := img.Converted
	if !fetched && s.Source.Guard && !public && !s.servedBy(img.Digest, repo) {
		if err := fetchLayers(ctx, src); err != nil {
			return fmt.Errorf("%s: this host holds an image of digest %s from another repository; its layers from %s: %w", ref, img.Digest, repo, err)
		}
		fetched = true
	}
	if !s.servedBy(img.Digest, repo) {
		f, err := os.OpenFile(filepath.Join(dir, originsFile), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintln(f, repo)
		if err = errors.Join(err, f.Close()); err != nil {
			return err
		}
	}
	if fetched && !public && s.anonymous(ref) {
		// Anyone may have it: another sandbox's use needs no credentials.
		return os.WriteFile(filepath.Join(dir, publicFile), nil, 0o644)
	}
	return nil
}

// servedBy says whether repo has served the image of digest here.
func (s *Store) servedBy(digest, repo string) bool {
	b, err := os.ReadFile(filepath.Join(s.blobDir(digest), originsFile))
	return err == nil && slices.Contains(strings.Split(string(b), "\n"), repo)
}

// fetchLayers reads every layer of a remote image through to its end,
// which checks it against its digest.
func fetchLayers(ctx context.Context, img v1.Image) error {
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	for _, l := range layers {
		if err := ctx.Err(); err != nil {
			return err
		}
		rc, err := l.Compressed()
		if err != nil {
			return err
		}
		_, err = io.Copy(io.Discard, rc)
		if err = errors.Join(err, rc.Close()); err != nil {
			return err
		}
	}
	return nil
}

// anonymous says whether the store's keychain has no credentials for
// ref's registry.
func (s *Store) anonymous(ref string) bool {
	r, err := ParseReference(ref, s.Source)
	if err != nil {
		return false
	}
	kc := s.Source.Keychain
	if kc == nil {
		return true
	}
	a, err := kc.Resolve(r.Context())
	return err == nil && a == authn.Anonymous
}

// mayUse checks, for a tenant's pull (Source.Guard), that a stored image
// pulled with someone's credentials is the tenant's too: its registry
// must accept the tenant's credentials (or none) for ref, at the same
// digest (errMoved if the tag names another now: the caller pulls that).
// An image once pulled anonymously is anyone's.
func (s *Store) mayUse(ctx context.Context, ref, digest string) error {
	if !s.Source.Guard {
		return nil
	}
	if _, err := os.Stat(filepath.Join(s.blobDir(digest), publicFile)); err == nil {
		return nil
	}
	d, err := Head(ctx, ref, s.Source)
	if err != nil {
		return err
	}
	if d != digest {
		return fmt.Errorf("%w: %s is %s now, this host holds %s", errMoved, ref, d, digest)
	}
	return nil
}

// errMoved: a tag names another image than the one held for it.
var errMoved = errors.New("the tag moved")

func canonicalRef(ref string) string {
	for _, p := range []string{ociPrefix, archivePrefix} {
		if rest, ok := strings.CutPrefix(ref, p); ok {
			if abs, err := filepath.Abs(rest); err == nil {
				return p + abs
			}
		}
	}
	return ref
}

func hexOf(digest string) string { return strings.TrimPrefix(digest, "sha256:") }

func (s *Store) blobDir(digest string) string { return filepath.Join(s.Dir, "blobs", hexOf(digest)) }

func (s *Store) load(ref, digest string) (*Image, error) {
	dir := s.blobDir(digest)
	b, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, err
	}
	var cfg v1.Config
	if err := json.Unmarshal(b, &cfg); err != nil {
		return nil, fmt.Errorf("image %s: config: %w", digest, err)
	}
	fi, err := os.Stat(filepath.Join(dir, "rootfs.erofs"))
	if err != nil {
		return nil, err
	}
	return &Image{Ref: ref, Digest: digest, RootFS: filepath.Join(dir, "rootfs.erofs"), Config: cfg, Size: fi.Size()}, nil
}

// lock takes a flock on the digest's lock file: exclusive to convert or
// remove, shared while a VM uses the image.
func (s *Store) lock(digest string, how int) (release func(), err error) {
	dir := filepath.Join(s.Dir, "locks")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, hexOf(digest)+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), how); err != nil {
		f.Close()
		return nil, err
	}
	return func() { f.Close() }, nil
}

// Use marks the image in use until release is called, so that rm and prune
// leave it alone.
func (s *Store) Use(digest string) (release func(), err error) {
	return s.lock(digest, unix.LOCK_SH)
}

func (s *Store) convert(ctx context.Context, ref, digest string, src v1.Image) (*Image, error) {
	// Wait for the exclusive lock without blocking in flock: once another
	// process has converted the image, the VMs it boots hold shared locks
	// for as long as they run, and a blocked LOCK_EX would wait for all of
	// them to end. Polling sees the converted image instead.
	var release func()
	for {
		if img, err := s.load(ref, digest); err == nil {
			return img, nil
		}
		r, err := s.lock(digest, unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			release = r
			break
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	defer release()
	if img, err := s.load(ref, digest); err == nil {
		return img, nil // another process converted it while we waited
	}
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("converting %s needs root: the image's owners and device nodes are kept as they are; run hearth as root", ref)
	}
	start := time.Now()
	if err := os.MkdirAll(filepath.Join(s.Dir, "tmp"), 0o755); err != nil {
		return nil, err
	}
	work, err := os.MkdirTemp(filepath.Join(s.Dir, "tmp"), hexOf(digest)[:12]+"-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)

	cf, err := src.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("%s: config: %w", ref, err)
	}
	if cf.OS != "" && cf.OS != "linux" {
		return nil, fmt.Errorf("%w: %s is a %s image", ErrInvalid, ref, cf.OS)
	}
	rootfs := filepath.Join(work, "rootfs")
	if err := os.Mkdir(rootfs, 0o755); err != nil {
		return nil, err
	}
	if err := s.unpack(ctx, ref, src, rootfs); err != nil {
		return nil, err
	}
	if s.Progress != nil {
		fmt.Fprintf(s.Progress, "converting %s to erofs\n", ref)
	}
	// mkfs.erofs keeps owners, modes, xattrs, hard links and devices;
	// uncompressed, because the guest then reads pages straight through.
	out, err := exec.CommandContext(ctx, "mkfs.erofs", "--quiet", filepath.Join(work, "rootfs.erofs"), rootfs).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("mkfs.erofs: %w: %s", err, bytes.TrimSpace(out))
	}
	cfgJSON, err := json.Marshal(cf.Config)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(work, "config.json"), cfgJSON, 0o644); err != nil {
		return nil, err
	}
	if err := os.RemoveAll(rootfs); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(s.Dir, "blobs"), 0o755); err != nil {
		return nil, err
	}
	if err := os.Rename(work, s.blobDir(digest)); err != nil {
		return nil, err
	}
	img, err := s.load(ref, digest)
	if err != nil {
		return nil, err
	}
	img.Converted = true
	if s.Log != nil {
		s.Log.Info("image converted", "ref", ref, "digest", digest, "bytes", img.Size, "took", time.Since(start))
	}
	return img, nil
}

func (s *Store) unpack(ctx context.Context, ref string, src v1.Image, rootfs string) error {
	layers, err := src.Layers()
	if err != nil {
		return fmt.Errorf("%s: layers: %w", ref, err)
	}
	var total int64
	for _, l := range layers {
		if n, err := l.Size(); err == nil {
			total += n
		}
	}
	var bar *progressbar.ProgressBar
	if s.Progress != nil {
		bar = progressbar.NewOptions64(total,
			progressbar.OptionSetWriter(s.Progress),
			progressbar.OptionSetDescription("pulling "+ref),
			progressbar.OptionShowBytes(true),
			progressbar.OptionShowCount(),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionOnCompletion(func() { fmt.Fprintln(s.Progress) }),
			progressbar.OptionClearOnFinish(),
		)
		defer bar.Finish()
	}
	usage := &Usage{Limits: s.Limits}
	if usage.Limits == (Limits{}) {
		usage.Limits = DefaultLimits
	}
	for i, l := range layers {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := applyCompressed(l, bar, rootfs, usage); err != nil {
			return fmt.Errorf("%s: layer %d: %w", ref, i, err)
		}
	}
	return nil
}

func applyCompressed(l v1.Layer, bar *progressbar.ProgressBar, rootfs string, usage *Usage) error {
	rc, err := l.Compressed()
	if err != nil {
		return err
	}
	defer rc.Close()
	var r io.Reader = rc
	if bar != nil {
		r = io.TeeReader(rc, bar)
	}
	u, err := decompress(r)
	if err != nil {
		return err
	}
	defer u.Close()
	return ApplyLayer(rootfs, u, usage)
}

// decompress recognises gzip and zstd layers by their magic numbers, and
// passes anything else through as an uncompressed tar.
func decompress(r io.Reader) (io.ReadCloser, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	magic, _ := br.Peek(4)
	switch {
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		return gzip.NewReader(br)
	case bytes.HasPrefix(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		d, err := zstd.NewReader(br)
		if err != nil {
			return nil, err
		}
		return d.IOReadCloser(), nil
	}
	return io.NopCloser(br), nil
}

// Entry is one line of `hearth image ls`.
type Entry struct {
	Ref    string `json:"ref"`
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
}

func (s *Store) refsPath() string { return filepath.Join(s.Dir, "refs.json") }

func (s *Store) withRefs(write bool, fn func(map[string]string) error) error {
	if err := os.MkdirAll(s.Dir, 0o755); err != nil {
		return err
	}
	lf, err := os.OpenFile(filepath.Join(s.Dir, "refs.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	defer lf.Close()
	how := unix.LOCK_SH
	if write {
		how = unix.LOCK_EX
	}
	if err := unix.Flock(int(lf.Fd()), how); err != nil {
		return err
	}
	refs := map[string]string{}
	old, err := os.ReadFile(s.refsPath())
	if err == nil {
		if err := json.Unmarshal(old, &refs); err != nil {
			return fmt.Errorf("%s: %w", s.refsPath(), err)
		}
	}
	if err := fn(refs); err != nil || !write {
		return err
	}
	b, err := json.MarshalIndent(refs, "", "  ")
	if err != nil {
		return err
	}
	if bytes.Equal(b, old) {
		return nil // every run of a stored image sets its ref: no rewrite for nothing
	}
	tmp := s.refsPath() + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, s.refsPath())
}

func (s *Store) lookupRef(ref string) (string, bool) {
	var d string
	_ = s.withRefs(false, func(m map[string]string) error { d = m[ref]; return nil })
	return d, d != ""
}

func (s *Store) setRef(ref, digest string) error {
	return s.withRefs(true, func(m map[string]string) error { m[ref] = digest; return nil })
}

// List returns the stored images by reference.
func (s *Store) List() ([]Entry, error) {
	var out []Entry
	err := s.withRefs(false, func(m map[string]string) error {
		for ref, d := range m {
			e := Entry{Ref: ref, Digest: d}
			if fi, err := os.Stat(filepath.Join(s.blobDir(d), "rootfs.erofs")); err == nil {
				e.Size = fi.Size()
			}
			out = append(out, e)
		}
		return nil
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Ref < out[j].Ref })
	return out, err
}

// ErrInUse means a running sandbox uses the image.
var ErrInUse = errors.New("image in use")

// Remove drops a reference (or every reference to a digest) and deletes the
// converted image once nothing refers to it.
func (s *Store) Remove(ref string) error {
	ref = canonicalRef(ref)
	var digest string
	err := s.withRefs(true, func(m map[string]string) error {
		digest = m[ref]
		if digest == "" {
			for r, d := range m {
				if d == ref || hexOf(d) == ref || strings.HasPrefix(hexOf(d), ref) && len(ref) >= 12 {
					digest = d
					delete(m, r)
				}
			}
		}
		if digest == "" {
			return fmt.Errorf("%w: no image %s in the store", ErrNotFound, ref)
		}
		delete(m, ref)
		for _, d := range m {
			if d == digest {
				digest = "" // still referenced
			}
		}
		return nil
	})
	if err != nil || digest == "" {
		return err
	}
	return s.removeBlob(digest)
}

func (s *Store) removeBlob(digest string) error {
	release, err := s.lock(digest, unix.LOCK_EX|unix.LOCK_NB)
	if err != nil {
		return fmt.Errorf("%w: %s", ErrInUse, digest)
	}
	defer release()
	return os.RemoveAll(s.blobDir(digest))
}

// Prune deletes converted images that no reference names and are not in
// use, and leftovers of interrupted conversions. It returns the digests
// removed.
func (s *Store) Prune() ([]string, error) {
	keep := map[string]bool{}
	if err := s.withRefs(false, func(m map[string]string) error {
		for _, d := range m {
			keep[hexOf(d)] = true
		}
		return nil
	}); err != nil {
		return nil, err
	}
	entries, _ := os.ReadDir(filepath.Join(s.Dir, "blobs"))
	var removed []string
	var errs []error
	for _, e := range entries {
		if keep[e.Name()] {
			continue
		}
		d := "sha256:" + e.Name()
		if err := s.removeBlob(d); err != nil {
			if !errors.Is(err, ErrInUse) {
				errs = append(errs, err)
			}
			continue
		}
		removed = append(removed, d)
	}
	// Work directories whose conversion lock is free were abandoned.
	tmps, _ := os.ReadDir(filepath.Join(s.Dir, "tmp"))
	for _, t := range tmps {
		prefix, _, _ := strings.Cut(t.Name(), "-")
		matches, _ := filepath.Glob(filepath.Join(s.Dir, "locks", prefix+"*.lock"))
		busy := false
		for _, m := range matches {
			if release, err := s.lock(strings.TrimSuffix(filepath.Base(m), ".lock"), unix.LOCK_EX|unix.LOCK_NB); err != nil {
				busy = true
			} else {
				release()
			}
		}
		if !busy {
			errs = append(errs, os.RemoveAll(filepath.Join(s.Dir, "tmp", t.Name())))
		}
	}
	return removed, errors.Join(errs...)
}
