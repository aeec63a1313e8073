package image

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"hearth.dev/hearth/internal/imagebuild"
	"hearth.dev/hearth/internal/testenv"
)

func newStore(t *testing.T) *Store {
	t.Helper()
	testenv.Need(t, os.Geteuid() == 0, "converting images sets owners: needs root")
	_, err := exec.LookPath("mkfs.erofs")
	testenv.Need(t, err == nil, "mkfs.erofs is not installed (apt-get install erofs-utils)")
	return &Store{Dir: t.TempDir(), Source: SourceOptions{Timeout: 5 * time.Second}}
}

func TestStoreConvertsOnce(t *testing.T) {
	s := newStore(t)
	reg := testenv.StartRegistry(t)
	img := testenv.BusyboxImage(t, v1.Config{Env: []string{"A=1"}, Cmd: []string{"sh"}})
	ref := reg.Push(t, img, "tools:1")
	want, _ := img.Digest()
	ctx := context.Background()

	// Many runs asking at once: one conversion.
	var wg sync.WaitGroup
	results := make([]*Image, 4)
	errs := make([]error, 4)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], errs[i] = s.Get(ctx, ref, PullAlways)
		}()
	}
	wg.Wait()
	converted := 0
	for i, r := range results {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if r.Digest != want.String() {
			t.Fatalf("digest %s, want %s", r.Digest, want)
		}
		if r.Converted {
			converted++
		}
	}
	if converted != 1 {
		t.Fatalf("%d conversions for 4 concurrent pulls, want 1", converted)
	}
	fi, err := os.Stat(results[0].RootFS)
	if err != nil {
		t.Fatal(err)
	}
	if len(results[0].Config.Env) != 1 || results[0].Config.Env[0] != "A=1" {
		t.Fatalf("config env %v", results[0].Config.Env)
	}

	// A second run of a converted image does no conversion work, and with
	// the default policy does not even ask the registry.
	again, err := s.Get(ctx, ref, PullMissing)
	if err != nil {
		t.Fatal(err)
	}
	fi2, _ := os.Stat(again.RootFS)
	if again.Converted || !fi2.ModTime().Equal(fi.ModTime()) {
		t.Fatalf("second get converted again (converted=%v)", again.Converted)
	}

	list, err := s.List()
	if err != nil || len(list) != 1 || list[0].Ref != ref || list[0].Size == 0 {
		t.Fatalf("list: %+v %v", list, err)
	}
	// In use: not removable.
	release, err := s.Use(again.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ref); !errors.Is(err, ErrInUse) {
		t.Fatalf("remove in use: %v", err)
	}
	release()
	if removed, err := s.Prune(); err != nil || len(removed) != 1 {
		t.Fatalf("prune after an rm that left the blob: %v %v", removed, err)
	}
	if _, err := os.Stat(again.RootFS); !os.IsNotExist(err) {
		t.Fatalf("rootfs still there: %v", err)
	}
	if entries, _ := os.ReadDir(s.Dir + "/tmp"); len(entries) != 0 {
		t.Fatalf("work directories left: %v", entries)
	}
}

func TestStoreErrors(t *testing.T) {
	s := newStore(t)
	reg := testenv.StartRegistry(t)
	ctx := context.Background()

	if _, err := s.Get(ctx, "Not A Ref!!", PullMissing); !errors.Is(err, ErrInvalid) {
		t.Errorf("bad reference: %v", err)
	}
	if _, err := s.Get(ctx, reg.Addr+"/nope:1", PullMissing); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing image: %v", err)
	}
	if _, err := s.Get(ctx, "oci:/nonexistent-dir", PullMissing); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing layout: %v", err)
	}
	if _, err := s.Get(ctx, reg.Addr+"/nope:1", PullNever); !errors.Is(err, ErrNotFound) {
		t.Errorf("--pull=never: %v", err)
	}

	// A registry that accepts connections and never answers.
	silent := testenv.SilentServer(t)
	s.Source.Timeout = time.Second
	start := time.Now()
	_, err := s.Get(ctx, silent+"/silent:1", PullMissing)
	if err == nil || !strings.Contains(err.Error(), "did not answer") {
		t.Errorf("silent registry: %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("silent registry took %s to fail", d)
	}
}

func TestLocalSources(t *testing.T) {
	s := newStore(t)
	img, err := imagebuild.Image(v1.Config{Cmd: []string{"x"}}, []imagebuild.File{{Path: "/x", Mode: 0o755, Body: []byte("x")}})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := imagebuild.WriteLayout(dir, "v1", img); err != nil {
		t.Fatal(err)
	}
	got, err := s.Get(context.Background(), "oci:"+dir+":v1", PullMissing)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	if got.Digest != want.String() || len(got.Config.Cmd) != 1 {
		t.Fatalf("got %s %v", got.Digest, got.Config.Cmd)
	}
	if _, err := s.Get(context.Background(), "oci:"+dir+":v2", PullMissing); !errors.Is(err, ErrNotFound) {
		t.Fatalf("missing tag: %v", err)
	}

	// A `docker save` tarball of the same image converts to the same thing.
	tarPath := filepath.Join(t.TempDir(), "image.tar")
	tag, err := name.NewTag("example.com/tools:1")
	if err != nil {
		t.Fatal(err)
	}
	if err := tarball.WriteToFile(tarPath, tag, img); err != nil {
		t.Fatal(err)
	}
	// Its manifest (docker media types) has another digest: converted once,
	// then found.
	var digests []string
	for i, ref := range []string{"docker-archive:" + tarPath, "docker-archive:" + tarPath + ":example.com/tools:1"} {
		got, err := s.Get(context.Background(), ref, PullMissing)
		if err != nil {
			t.Fatalf("%s: %v", ref, err)
		}
		if got.Converted != (i == 0) || len(got.Config.Cmd) != 1 || got.Config.Cmd[0] != "x" {
			t.Fatalf("%s: converted=%v cmd %q", ref, got.Converted, got.Config.Cmd)
		}
		digests = append(digests, got.Digest)
	}
	if digests[0] != digests[1] {
		t.Fatalf("the tarball gave two digests: %v", digests)
	}
	if _, err := s.Get(context.Background(), "docker-archive:"+tarPath+":example.com/other:1", PullMissing); err == nil {
		t.Fatal("a tag not in the tarball was accepted")
	}
}

func TestSplitTag(t *testing.T) {
	for _, tc := range []struct{ in, path, tag string }{
		{"/a/b", "/a/b", ""},
		{"/a/b:v1", "/a/b", "v1"},
		{"/a:b/c", "/a:b/c", ""},
		{"rel:latest", "rel", "latest"},
	} {
		p, tag := splitTag(tc.in)
		if p != tc.path || tag != tc.tag {
			t.Errorf("splitTag(%q) = %q, %q", tc.in, p, tag)
		}
	}
}

// TestUnpackLimits: a gzip bomb (a small compressed layer that unpacks to
// far more) and a layer of too many entries are refused with
// ErrTooLarge, naming the limit, and leave nothing in the store.
func TestUnpackLimits(t *testing.T) {
	s := newStore(t)
	s.Limits = Limits{Bytes: 32 << 20, Entries: 1000}
	reg := testenv.StartRegistry(t)
	bomb := testenv.BusyboxImage(t, v1.Config{Cmd: []string{"sh"}}, []F{{Path: "zeros", Mode: 0o644, Body: make([]byte, 64<<20)}})
	var many []F
	for i := range 1200 {
		many = append(many, F{Path: fmt.Sprintf("d/f%d", i), Mode: 0o644})
	}
	crowd := testenv.BusyboxImage(t, v1.Config{Cmd: []string{"sh"}}, many)
	for name, tc := range map[string]struct {
		img  v1.Image
		want string
	}{
		"bomb":  {bomb, "it unpacks to more than 33554432 bytes, the limit (at zeros)"},
		"crowd": {crowd, "it unpacks to more than 1000 files, the limit"},
	} {
		layers, _ := tc.img.Layers()
		compressed, _ := layers[len(layers)-1].Size()
		_, err := s.Get(context.Background(), reg.Push(t, tc.img, name+":1"), PullAlways)
		if !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s (last layer %d bytes compressed): %v, want ErrTooLarge: %s", name, compressed, err, tc.want)
		}
	}
	if blobs, _ := filepath.Glob(filepath.Join(s.Dir, "blobs", "*")); len(blobs) != 0 {
		t.Errorf("refused images left %v", blobs)
	}
	if left, _ := filepath.Glob(filepath.Join(s.Dir, "*", "*")); len(left) != 0 {
		t.Logf("store after refusals: %v", left)
	}
}

// A tenant's pull (Guard) reaches no registry on a loopback, private or
// link-local address but those listed.
func TestGuardedPulls(t *testing.T) {
	reg := testenv.StartRegistry(t)
	ref := reg.Push(t, testenv.BusyboxImage(t, v1.Config{Cmd: []string{"sh"}}, nil), "guarded:1")
	ctx := context.Background()
	host, _, _ := strings.Cut(reg.Addr, ":")
	for _, tc := range []struct {
		name string
		opts SourceOptions
		ok   bool
	}{
		{"unguarded (the person at the host)", SourceOptions{}, true},
		{"guarded", SourceOptions{Guard: true}, false},
		{"guarded, the registry listed by host:port", SourceOptions{Guard: true, Private: []string{reg.Addr}}, true},
		{"guarded, the registry listed by host", SourceOptions{Guard: true, Private: []string{host}}, true},
		{"guarded, an insecure registry", SourceOptions{Guard: true, Insecure: []string{reg.Addr}}, true},
		{"guarded, another listed", SourceOptions{Guard: true, Private: []string{"10.0.0.5:5000"}}, false},
	} {
		_, err := Open(ctx, ref, tc.opts)
		if (err == nil) != tc.ok {
			t.Errorf("%s: %v, want ok %v", tc.name, err, tc.ok)
		}
		if err != nil && !tc.ok && (!errors.Is(err, ErrForbiddenRegistry) || !strings.Contains(err.Error(), "registry "+reg.Addr+" is at 127.0.0.1")) {
			t.Errorf("%s: the error %q does not say where the registry is", tc.name, err)
		}
	}
	// A name that resolves to loopback is refused too: the check is on
	// the address dialed.
	if _, err := Open(ctx, strings.Replace(ref, "127.0.0.1", "localhost", 1), SourceOptions{Guard: true}); !errors.Is(err, ErrForbiddenRegistry) {
		t.Errorf("localhost: %v", err)
	}
	for addr, want := range map[string]bool{"127.0.0.1": true, "10.1.2.3": true, "172.16.0.1": true, "192.168.1.1": true,
		"169.254.169.254": true, "100.64.0.1": true, "0.0.0.0": true, "::1": true, "fd00::1": true, "fe80::1": true,
		"8.8.8.8": false, "2001:4860:4860::8888": false, "::ffff:10.0.0.1": true,
		"198.18.0.1": true, "240.0.0.1": true, "255.255.255.255": true, "192.0.0.8": true,
		"64:ff9b::a00:1": true, "2002:a00:1::1": true} {
		if got := privateAddr(netip.MustParseAddr(addr)); got != want {
			t.Errorf("privateAddr(%s) = %v, want %v", addr, got, want)
		}
	}
	// The addresses refused by name (the cluster's hosts) and this
	// machine's own, public ones too: the dialer's check, without a dial.
	d := guardedDialer(&net.Dialer{}, "r.example", []netip.Addr{netip.MustParseAddr("203.0.113.7")})
	check := map[string]bool{"203.0.113.7:443": false, "203.0.113.8:443": true}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, ia := range addrs {
			if n, ok := ia.(*net.IPNet); ok {
				check[net.JoinHostPort(n.IP.String(), "443")] = false
			}
		}
	}
	for addr, ok := range check {
		if err := d.Control("tcp", addr, nil); (err == nil) != ok {
			t.Errorf("a guarded dial of %s: %v, want allowed %v", addr, err, ok)
		}
	}
}

// An image a tenant pulled with its credentials is another tenant's only
// if the registry takes the other's credentials: the store checks before
// it hands a held image to a guarded (tenant's) pull.
func TestPrivateImages(t *testing.T) {
	s := newStore(t)
	reg := testenv.StartAuthRegistry(t, "alice", "s3cret")
	privateImage := testenv.BusyboxImage(t, v1.Config{Cmd: []string{"sh"}})
	ref := reg.Push(t, privateImage, "private:1")
	ctx := context.Background()
	as := func(creds Credentials) *Store {
		return &Store{Dir: s.Dir, Source: SourceOptions{Timeout: 5 * time.Second, Guard: true, Private: []string{"127.0.0.1"}, Keychain: creds}}
	}
	// A docker config, as a kubernetes.io/dockerconfigjson Secret holds it.
	alice := Credentials{}
	if err := alice.AddDockerConfig([]byte(`{"auths": {"http://` + reg.Addr + `/v2/": {"auth": "YWxpY2U6czNjcmV0"}}}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := as(Credentials{}).Get(ctx, ref, PullMissing); err == nil {
		t.Fatal("an anonymous pull of a private image went through")
	}
	img, err := as(alice).Get(ctx, ref, PullMissing)
	if err != nil {
		t.Fatalf("alice's pull: %v", err)
	}
	if !img.Converted {
		t.Error("alice's pull did not convert the image")
	}
	for name, creds := range map[string]Credentials{
		"no credentials":    {},
		"wrong credentials": {reg.Addr: {Username: "alice", Password: "guess"}},
	} {
		if _, err := as(creds).Get(ctx, ref, PullMissing); err == nil {
			t.Errorf("%s: the image alice pulled was handed over", name)
		}
	}
	if img, err := as(alice).Get(ctx, ref, PullMissing); err != nil || img.Converted {
		t.Errorf("alice again: %v (converted %v), want the held image", err, img != nil && img.Converted)
	}
	// A registry that knows the manifest only (not the layers) serves the
	// same digest under a repository of its own: refused, and the image
	// stays alice's.
	private := img.Digest
	// The tag moves: alice's next pull gets what it names now.
	reg.Push(t, testenv.BusyboxImage(t, v1.Config{Cmd: []string{"sh"}, Env: []string{"V=2"}}), "private:1")
	if img, err := as(alice).Get(ctx, ref, PullMissing); err != nil || img.Digest == private || !img.Converted {
		t.Errorf("alice after the tag moved: %v, %+v; want the new image pulled", err, img)
	}
	evil := manifestOnlyRegistry(t, privateImage)
	if _, err := as(Credentials{}).Get(ctx, evil+"/copy:1", PullMissing); err == nil || !strings.Contains(err.Error(), "another repository") {
		t.Errorf("a manifest-only registry's copy of alice's image: %v, want refused", err)
	}
	if _, err := as(Credentials{}).Get(ctx, ref, PullMissing); err == nil {
		t.Error("after a manifest-only registry's try, alice's image was handed over without credentials")
	}
	// One that has the layers has the image: it may use what is held.
	public := testenv.StartRegistry(t)
	copyRef := public.Push(t, privateImage, "copy:1")
	if img, err := as(Credentials{}).Get(ctx, copyRef, PullMissing); err != nil || img.Digest != private {
		t.Errorf("an anonymous pull of the same image from a registry that has it: %v, want %s", err, private)
	}
	// The person at the host (no guard) uses what the host holds.
	if _, err := (&Store{Dir: s.Dir}).Get(ctx, ref, PullMissing); err != nil {
		t.Errorf("an unguarded use of a held image: %v", err)
	}
}

// manifestOnlyRegistry serves img's manifest under any name, and no blob:
// a registry that has seen a manifest and nothing more. It returns its
// host:port.
func manifestOnlyRegistry(t *testing.T, img v1.Image) string {
	manifest, err := img.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	mt, err := img.MediaType()
	if err != nil {
		t.Fatal(err)
	}
	digest, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/v2/":
		case strings.Contains(r.URL.Path, "/manifests/"):
			w.Header().Set("Content-Type", string(mt))
			w.Header().Set("Docker-Content-Digest", digest.String())
			w.Header().Set("Content-Length", strconv.Itoa(len(manifest)))
			_, _ = w.Write(manifest)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}
