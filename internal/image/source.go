package image

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// ErrNotFound means the image does not exist where the reference points.
var ErrNotFound = errors.New("image not found")

// ErrInvalid means the reference cannot be parsed.
var ErrInvalid = errors.New("invalid image reference")

// SourceOptions says how to reach registries.
type SourceOptions struct {
	// Insecure lists registries (host[:port]) reached over plain HTTP.
	// localhost and 127.0.0.1 always are.
	Insecure []string
	// Timeout bounds connecting to a registry and waiting for each answer,
	// so that a registry that does not answer fails instead of hanging.
	Timeout time.Duration
	// Guard refuses to connect to registries at loopback, private,
	// link-local, shared (100.64.0.0/10) or unspecified addresses, checked
	// on the address dialed (after DNS, so a name that resolves there is
	// refused too), but for the registries listed in Private (host or
	// host:port) or Insecure: a tenant's image reference must not make the
	// node a client of its own management network or its loopback services.
	Guard   bool
	Private []string
	// Refused are more addresses a guarded pull never connects to: the
	// cluster's hosts and control plane. This machine's own addresses
	// always are.
	Refused []netip.Addr
	// Keychain gives credentials for registries (nil: none, anonymous
	// pulls).
	Keychain authn.Keychain
}

// ErrForbiddenRegistry means a guarded pull would reach a private address.
var ErrForbiddenRegistry = errors.New("registry on a private address")

// Registry is the registry (host[:port]) a reference pulls from; Docker
// Hub's is index.docker.io.
func Registry(ref string) (string, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return "", fmt.Errorf("%w %q: %v", ErrInvalid, ref, err)
	}
	return r.Context().RegistryStr(), nil
}

// Listed says whether registry (host[:port]) is in list, by host:port or
// by host alone.
func Listed(list []string, registry string) bool {
	host := registry
	if h, _, err := net.SplitHostPort(registry); err == nil {
		host = h
	}
	for _, l := range list {
		if l == registry || l == host {
			return true
		}
	}
	return false
}

// refusedRanges are the ranges beyond loopback, private, link-local,
// multicast and unspecified that no guarded pull connects to: shared
// (CGNAT), IETF protocol assignments, benchmarking, reserved, "this
// network", and the IPv6 prefixes that carry an IPv4 address (NAT64,
// 6to4), which could carry any of those.
var refusedRanges = []netip.Prefix{
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("192.0.0.0/24"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("240.0.0.0/4"),
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("64:ff9b::/96"),
	netip.MustParsePrefix("64:ff9b:1::/48"),
	netip.MustParsePrefix("2002::/16"),
}

// privateAddr reports an address no guarded pull connects to, whoever's.
func privateAddr(a netip.Addr) bool {
	a = a.Unmap()
	if a.IsLoopback() || a.IsPrivate() || a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() || a.IsUnspecified() ||
		a.IsMulticast() || a.IsInterfaceLocalMulticast() {
		return true
	}
	for _, p := range refusedRanges {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// localAddr reports an address of this machine's own interfaces (a
// public one too: what listens there is the host's).
func localAddr(a netip.Addr) bool {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return true // cannot tell: refused
	}
	for _, ia := range addrs {
		if n, ok := ia.(*net.IPNet); ok {
			if b, ok := netip.AddrFromSlice(n.IP); ok && b.Unmap() == a.Unmap() {
				return true
			}
		}
	}
	return false
}

// guardedDialer refuses connections to private addresses, this machine's
// own and those refused (after DNS).
func guardedDialer(d *net.Dialer, registry string, refused []netip.Addr) *net.Dialer {
	d.Control = func(_, address string, _ syscall.RawConn) error {
		ap, err := netip.ParseAddrPort(address)
		if err != nil {
			return fmt.Errorf("%w: cannot tell where %s is", ErrForbiddenRegistry, address)
		}
		a := ap.Addr().Unmap()
		if privateAddr(a) || localAddr(a) || slices.Contains(refused, a) {
			return fmt.Errorf("%w: registry %s is at %s; nodes pull from the cluster's hosts and loopback, private and link-local addresses only for the registries they list (hearthd --private-registry)",
				ErrForbiddenRegistry, registry, a)
		}
		return nil
	}
	return d
}

// Source prefixes for local images.
const (
	ociPrefix     = "oci:"
	archivePrefix = "docker-archive:"
)

// IsLocal says whether ref names files on this host (oci:, docker-archive:)
// rather than a registry's image.
func IsLocal(ref string) bool {
	return strings.HasPrefix(ref, ociPrefix) || strings.HasPrefix(ref, archivePrefix)
}

// Open resolves ref to an image: a registry reference, "oci:DIR[:TAG]" (an
// OCI image layout) or "docker-archive:FILE[:TAG]" (a docker save tarball).
func Open(ctx context.Context, ref string, opts SourceOptions) (v1.Image, error) {
	switch {
	case strings.HasPrefix(ref, ociPrefix):
		dir, tag := splitTag(strings.TrimPrefix(ref, ociPrefix))
		return openLayout(dir, tag)
	case strings.HasPrefix(ref, archivePrefix):
		file, tag := splitArchive(strings.TrimPrefix(ref, archivePrefix))
		var t *name.Tag
		if tag != "" {
			nt, err := name.NewTag(tag)
			if err != nil {
				return nil, fmt.Errorf("%w %q: %v", ErrInvalid, ref, err)
			}
			t = &nt
		}
		img, err := tarball.ImageFromPath(file, t)
		if err != nil {
			return nil, fmt.Errorf("%w: docker archive %s: %v", ErrNotFound, file, err)
		}
		return img, nil
	}
	r, err := ParseReference(ref, opts)
	if err != nil {
		return nil, err
	}
	img, err := remote.Image(r, remoteOptions(ctx, r, opts)...)
	if err != nil {
		return nil, registryError(r, err)
	}
	return img, nil
}

// Head asks the registry for ref's manifest digest, with opts' credentials
// (an image the registry does not give them is refused here).
func Head(ctx context.Context, ref string, opts SourceOptions) (string, error) {
	r, err := ParseReference(ref, opts)
	if err != nil {
		return "", err
	}
	desc, err := remote.Head(r, remoteOptions(ctx, r, opts)...)
	if err != nil {
		return "", registryError(r, err)
	}
	return desc.Digest.String(), nil
}

// remoteOptions are how Open and Head reach r's registry.
func remoteOptions(ctx context.Context, r name.Reference, opts SourceOptions) []remote.Option {
	timeout := opts.Timeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	dialer := &net.Dialer{Timeout: timeout}
	registry := r.Context().RegistryStr()
	proxy := http.ProxyFromEnvironment
	if opts.Guard && !Listed(opts.Private, registry) && !Listed(opts.Insecure, registry) {
		dialer = guardedDialer(dialer, registry, opts.Refused)
		// Through a proxy the guard would check the proxy's address, not
		// the registry's: guarded pulls go direct.
		proxy = nil
	}
	keychain := opts.Keychain
	if keychain == nil {
		keychain = anonymous{}
	}
	tr := &http.Transport{
		Proxy:                 proxy,
		DialContext:           dialer.DialContext,
		TLSHandshakeTimeout:   timeout,
		ResponseHeaderTimeout: timeout,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConnsPerHost:   8,
	}
	return []remote.Option{
		remote.WithContext(ctx),
		remote.WithAuthFromKeychain(keychain),
		remote.WithTransport(tr),
		remote.WithPlatform(v1.Platform{OS: "linux", Architecture: "amd64"}),
		// One retry, not go-containerregistry's two: a registry that did
		// not answer within Timeout twice is down, and the user is waiting.
		remote.WithRetryBackoff(remote.Backoff{Duration: time.Second, Factor: 3, Jitter: 0.1, Steps: 2}),
	}
}

// ParseReference parses a registry reference, treating registries listed
// in opts.Insecure as plain HTTP.
func ParseReference(ref string, opts SourceOptions) (name.Reference, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return nil, fmt.Errorf("%w %q: %v", ErrInvalid, ref, err)
	}
	for _, reg := range opts.Insecure {
		if r.Context().RegistryStr() == reg {
			return name.ParseReference(ref, name.Insecure)
		}
	}
	return r, nil
}

// anonymous is the keychain of no credentials.
type anonymous struct{}

func (anonymous) Resolve(authn.Resource) (authn.Authenticator, error) { return authn.Anonymous, nil }

func registryError(r name.Reference, err error) error {
	var te *transport.Error
	if errors.As(err, &te) {
		if te.StatusCode == http.StatusNotFound {
			return fmt.Errorf("%w: %s is not in registry %s", ErrNotFound, r, r.Context().RegistryStr())
		}
		for _, d := range te.Errors {
			if d.Code == transport.ManifestUnknownErrorCode || d.Code == transport.NameUnknownErrorCode {
				return fmt.Errorf("%w: %s is not in registry %s", ErrNotFound, r, r.Context().RegistryStr())
			}
		}
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("registry %s did not answer in time: %w", r.Context().RegistryStr(), err)
	}
	return fmt.Errorf("pull %s: %w", r, err)
}

// splitTag splits "PATH:TAG" at its last colon when what follows looks like
// a tag rather than part of a path.
func splitTag(s string) (string, string) {
	i := strings.LastIndexByte(s, ':')
	if i < 0 || strings.Contains(s[i+1:], "/") {
		return s, ""
	}
	return s[:i], s[i+1:]
}

// splitArchive splits "FILE[:REFERENCE]": the reference may hold colons
// itself (host:port/name:tag), so FILE is the shortest prefix that is a file.
func splitArchive(s string) (string, string) {
	for i := 0; i < len(s); i++ {
		if s[i] != ':' {
			continue
		}
		if fi, err := os.Stat(s[:i]); err == nil && fi.Mode().IsRegular() {
			return s[:i], s[i+1:]
		}
	}
	return s, ""
}

func openLayout(dir, tag string) (v1.Image, error) {
	p, err := layout.FromPath(dir)
	if err != nil {
		return nil, fmt.Errorf("%w: OCI layout %s: %v", ErrNotFound, dir, err)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		return nil, fmt.Errorf("OCI layout %s: %w", dir, err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("OCI layout %s: %w", dir, err)
	}
	var found []v1.Descriptor
	for _, d := range m.Manifests {
		refName := d.Annotations["org.opencontainers.image.ref.name"]
		if tag == "" || refName == tag || strings.HasSuffix(refName, ":"+tag) {
			found = append(found, d)
		}
	}
	switch {
	case len(found) == 0 && tag != "":
		return nil, fmt.Errorf("%w: no image tagged %q in OCI layout %s", ErrNotFound, tag, dir)
	case len(found) == 0:
		return nil, fmt.Errorf("%w: OCI layout %s holds no image", ErrNotFound, dir)
	case len(found) > 1:
		return nil, fmt.Errorf("%w: OCI layout %s holds %d images; name one with oci:%s:TAG", ErrInvalid, dir, len(found), dir)
	}
	if found[0].MediaType.IsIndex() {
		child, err := idx.ImageIndex(found[0].Digest)
		if err != nil {
			return nil, err
		}
		return pickPlatform(child)
	}
	return idx.Image(found[0].Digest)
}

func pickPlatform(idx v1.ImageIndex) (v1.Image, error) {
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	for _, d := range m.Manifests {
		if d.Platform == nil || (d.Platform.OS == "linux" && d.Platform.Architecture == "amd64") {
			return idx.Image(d.Digest)
		}
	}
	return nil, fmt.Errorf("%w: no linux/amd64 image in the index", ErrNotFound)
}

// Credentials are registry credentials by registry (host[:port]): a
// keychain of a sandbox's pull secrets.
type Credentials map[string]authn.AuthConfig

// Resolve implements authn.Keychain: the registry's credentials, or none.
func (c Credentials) Resolve(r authn.Resource) (authn.Authenticator, error) {
	if cfg, ok := c[r.RegistryStr()]; ok {
		return authn.FromConfig(cfg), nil
	}
	return authn.Anonymous, nil
}

// dockerHub is Docker Hub's key in a docker config.
const dockerHub = "https://index.docker.io/v1/"

// AddDockerConfig adds the credentials of a docker config file (a
// kubernetes.io/dockerconfigjson Secret's .dockerconfigjson: {"auths":
// {REGISTRY: {"username", "password"} or {"auth": base64(user:pass)}}}).
// Keys may be URLs ("https://reg.example/v1/"): the host is what counts.
func (c Credentials) AddDockerConfig(b []byte) error {
	var cfg struct {
		Auths map[string]authn.AuthConfig `json:"auths"`
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return fmt.Errorf("a docker config: %w", err)
	}
	for k, v := range cfg.Auths {
		host := k
		if k == dockerHub || k == "docker.io" {
			host = name.DefaultRegistry
		} else if u, err := url.Parse(k); err == nil && u.Host != "" {
			host = u.Host
		}
		c[host] = v
	}
	return nil
}
