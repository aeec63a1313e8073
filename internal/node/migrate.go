package node

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/logfile"
	"hearth.dev/hearth/internal/pki"
	"hearth.dev/hearth/internal/shim"
	"hearth.dev/hearth/internal/vmm"
)

// A migration between two hosts, as their node agents see it (the
// control plane has picked the target: internal/migration):
//
//  1. Preparing: the target's agent gives the sandbox an address of its
//     range and a tap, starts a shim in incoming mode whose stream is one
//     end of a socket pair, and keeps the other end for the source; once
//     the shim has the image (State.Prepared), Copying, with the address.
//  2. Copying: the source's agent connects to the target's stream server
//     (mutual TLS: each side's certificate from the streams CA names its
//     node, and the target takes the stream only from the migration's
//     source), and relays between that connection and a socket pair whose
//     other end it sends its shim (shim.Migrate). The shims' sandbox
//     layers check, bound and hand over (docs/migration.md).
//  3. The target's agent takes the source's log of the run that handed
//     over (serveMigrationLog) and reports Succeeded once its shim runs the
//     sandbox; the control plane then binds the sandbox to the target,
//     whose agent serves it from then on as any other, and the source's
//     agent lets go of its run (it ended Migrated) and its address.
//
// A failure at any step is Failed with the reason; the sandbox runs on at
// the source, and the target removes what it prepared. Deleting the
// Migration cancels it (before the handover: after it, the move
// completes).

// upgradeMigration is the protocol a migration stream's request upgrades
// to.
const upgradeMigration = "hearth-migration"

// moves are this host's migrations under way.
type moves struct {
	mu  sync.Mutex
	in  map[types.NamespacedName]*incomingMove
	out map[types.NamespacedName]context.CancelFunc
}

// incomingMove is a migration to this host, prepared.
type incomingMove struct {
	uid, sandbox types.UID
	source       string // the node whose agent may send the stream
	dir, run     string
	log          string   // the run's log
	ip           string   // the sandbox's address here ("": no network)
	stream       net.Conn // the relay's end of the shim's stream; nil once taken
}

func newMoves() *moves {
	return &moves{in: map[types.NamespacedName]*incomingMove{}, out: map[types.NamespacedName]context.CancelFunc{}}
}

// receiving reports whether a sandbox's directory is an incoming
// migration's (not garbage while the sandbox is bound elsewhere).
func (m *moves) receiving(sandbox types.UID) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, in := range m.in {
		if in.sandbox == sandbox {
			return true
		}
	}
	return false
}

// take hands the stream of migration uid to its source's connection,
// once.
func (m *moves) take(uid types.UID, from string) (net.Conn, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, in := range m.in {
		if in.uid != uid {
			continue
		}
		if in.source != from {
			return nil, fmt.Errorf("migration %s comes from %s, not %s", uid, in.source, from)
		}
		if in.stream == nil {
			return nil, fmt.Errorf("migration %s has its stream already", uid)
		}
		s := in.stream
		in.stream = nil
		return s, nil
	}
	return nil, fmt.Errorf("no migration %s waits here", uid)
}

// migrationReconciler is the node agent's side of Migrations: this host
// as a target, or as a source.
type migrationReconciler struct{ a *Agent }

func (r migrationReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	a := r.a
	var m v1alpha1.Migration
	err := a.client.Get(ctx, req.NamespacedName, &m)
	if err != nil && !apierrors.IsNotFound(err) {
		return reconcile.Result{}, err
	}
	if err != nil {
		// Gone (its finalizer is released once it has ended and its
		// sandbox is bound where it runs): what is left here of it is
		// garbage unless the sandbox is bound here.
		a.cancelOutgoing(req.NamespacedName)
		a.moves.mu.Lock()
		in := a.moves.in[req.NamespacedName]
		a.moves.mu.Unlock()
		if in != nil {
			a.dropIncoming(ctx, req.NamespacedName, !a.exists(ctx, in.sandbox))
		}
		return reconcile.Result{}, nil
	}
	deleting := !m.DeletionTimestamp.IsZero()
	switch a.cfg.Name {
	case m.Status.TargetHost:
		return a.receive(ctx, &m, deleting)
	case m.Status.SourceHost:
		switch {
		case deleting || m.Status.Phase.Terminal():
			a.cancelOutgoing(req.NamespacedName)
		case m.Status.Phase == v1alpha1.MigrationCopying:
			a.send(&m)
		}
	}
	return reconcile.Result{}, nil
}

// receive is the target's part; deleting, it cancels what has not
// switched.
func (a *Agent) receive(ctx context.Context, m *v1alpha1.Migration, deleting bool) (reconcile.Result, error) {
	key := types.NamespacedName{Namespace: m.Namespace, Name: m.Name}
	a.moves.mu.Lock()
	in := a.moves.in[key]
	a.moves.mu.Unlock()
	if deleting && !m.Status.Phase.Terminal() {
		if in != nil {
			if st, err := shim.ReadState(in.run); err == nil && (st.HandedOver || st.Phase == shim.Running) {
				// Too late to cancel: the source's VM is ended.
				return reconcile.Result{RequeueAfter: 200 * time.Millisecond}, a.whenRunning(ctx, m, in, st)
			}
			a.dropIncoming(ctx, key, true)
		}
		return reconcile.Result{}, a.migrationFailed(ctx, m, "Cancelled", errors.New("the migration was deleted before the switch"))
	}
	switch m.Status.Phase {
	case v1alpha1.MigrationPreparing:
		if in == nil {
			var err error
			if in, err = a.prepareIncoming(ctx, m, key); err != nil {
				return reconcile.Result{}, a.migrationFailed(ctx, m, "PrepareFailed", err)
			}
		}
		// The source may send once the incoming shim has the image.
		st, err := shim.ReadState(in.run)
		switch {
		case err != nil:
			return reconcile.Result{}, err
		case st.Phase == shim.Exited || !shim.Alive(in.run):
			a.dropIncoming(ctx, key, true)
			return reconcile.Result{}, a.migrationFailed(ctx, m, orDefault(st.Reason, "PrepareFailed"), errors.New(orDefault(st.Message, "the incoming VM ended")))
		case !st.Prepared:
			return reconcile.Result{RequeueAfter: 200 * time.Millisecond}, nil
		}
		// (Again if the last write failed.)
		return reconcile.Result{}, a.updateMigration(ctx, m, func(st *v1alpha1.MigrationStatus) {
			if st.Phase == v1alpha1.MigrationPreparing {
				st.Phase, st.TargetIP = v1alpha1.MigrationCopying, in.ip
			}
		})
	case v1alpha1.MigrationCopying:
		if in == nil {
			return reconcile.Result{}, a.migrationFailed(ctx, m, "TargetRestarted", errors.New("the target's node agent restarted and lost the incoming VM"))
		}
		st, err := shim.ReadState(in.run)
		switch {
		case err != nil:
			return reconcile.Result{}, err
		case st.Phase == shim.Running:
			return reconcile.Result{RequeueAfter: time.Second}, a.whenRunning(ctx, m, in, st)
		case st.Phase == shim.Exited || !shim.Alive(in.run):
			a.dropIncoming(ctx, key, true)
			return reconcile.Result{}, a.migrationFailed(ctx, m, orDefault(st.Reason, "MigrationFailed"), errors.New(orDefault(st.Message, "the incoming VM ended")))
		}
		return reconcile.Result{RequeueAfter: 200 * time.Millisecond}, nil
	case v1alpha1.MigrationSucceeded:
		// Held until the sandbox is bound here (the control plane's
		// part): from then on the sandbox reconciler serves it.
		if in == nil || a.exists(ctx, in.sandbox) {
			a.dropIncoming(ctx, key, false)
			return reconcile.Result{}, nil
		}
		return reconcile.Result{RequeueAfter: 500 * time.Millisecond}, nil
	case v1alpha1.MigrationFailed:
		a.dropIncoming(ctx, key, true)
	}
	return reconcile.Result{}, nil
}

// whenRunning reports, once the incoming run serves the sandbox, that the
// sandbox runs here now, with the log of its run before.
func (a *Agent) whenRunning(ctx context.Context, m *v1alpha1.Migration, in *incomingMove, st shim.State) error {
	if st.Phase != shim.Running {
		return nil // handed over, not serving yet
	}
	if err := a.fetchLog(ctx, m, in.log); err != nil {
		a.log.Warn("migration: the source's log", "migration", m.Namespace+"/"+m.Name, "err", err)
	}
	return a.updateMigration(ctx, m, func(s *v1alpha1.MigrationStatus) {
		if !s.Phase.Terminal() {
			now := metav1.Now()
			s.Phase, s.CompletedAt = v1alpha1.MigrationSucceeded, &now
		}
	})
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

// prepareIncoming readies this host for the migration's sandbox: an
// address and a tap, and a shim waiting for the stream.
func (a *Agent) prepareIncoming(ctx context.Context, m *v1alpha1.Migration, key types.NamespacedName) (_ *incomingMove, err error) {
	var sb v1alpha1.Sandbox
	if err := a.reader.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.Sandbox}, &sb); err != nil {
		return nil, err
	}
	if sb.UID != m.Status.SandboxUID {
		return nil, fmt.Errorf("sandbox %s is not the one the migration began with", sb.Name)
	}
	var ip string
	dir := a.sandboxDir(sb.UID)
	if _, err := os.Stat(dir); err == nil {
		return nil, fmt.Errorf("this host still has files of sandbox %s (%s)", sb.Name, dir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, a.net.release(sb.UID, dir), os.RemoveAll(dir))
		}
	}()
	spec := shim.Spec{Sandbox: sandboxSpec(&sb)}
	if a.net.enabled {
		if !a.net.isReady() {
			return nil, errors.New("the host has no sandbox range yet")
		}
		// An address of this host's range: until addresses follow their
		// sandboxes, the guest takes it at the switch (the migrated
		// control's network).
		here := sb.DeepCopy()
		here.Status.IP = ""
		if _, err := a.net.lease(here); err != nil {
			return nil, err
		}
		tap, nic, err := a.net.attach(here, dir)
		if err != nil {
			return nil, fmt.Errorf("network: %w", err)
		}
		spec.Sandbox.Tap, spec.Sandbox.Network, ip = tap, nic, here.Status.IP
	}
	started := time.Now()
	if sb.Status.StartedAt != nil {
		started = sb.Status.StartedAt.Time
	}
	if err := markStarted(dir, started); err != nil {
		return nil, err
	}
	n := int(sb.Status.RestartCount)
	run := runDir(dir, n)
	spec.Log = filepath.Join("..", filepath.Base(logPath(dir, n)))
	spec.LogMax = a.cfg.LogMax
	a.hostSpec(ctx, &spec)
	recv, relayEnd, err := vmm.StreamFileConn()
	if err != nil {
		return nil, err
	}
	defer recv.Close() // the shim has its own
	if _, err := shim.StartIncoming(run, spec, a.cfg.Shim, recv); err != nil {
		relayEnd.Close()
		return nil, err
	}
	in := &incomingMove{uid: m.UID, sandbox: sb.UID, source: m.Status.SourceHost, dir: dir, run: run, log: logPath(dir, n), ip: ip, stream: relayEnd}
	a.moves.mu.Lock()
	a.moves.in[key] = in
	a.moves.mu.Unlock()
	a.log.Info("migration: waiting for the stream", "sandbox", m.Namespace+"/"+sb.Name, "from", m.Status.SourceHost, "run", n)
	return in, nil
}

// dropIncoming forgets a migration to this host; with discard (it did
// not take the sandbox over) its shim, files and address go too.
func (a *Agent) dropIncoming(ctx context.Context, key types.NamespacedName, discard bool) {
	a.moves.mu.Lock()
	in := a.moves.in[key]
	delete(a.moves.in, key)
	a.moves.mu.Unlock()
	if in == nil {
		return
	}
	if in.stream != nil {
		in.stream.Close()
	}
	if !discard {
		return
	}
	err := errors.Join(shim.Stop(ctx, in.run, stopGrace), a.net.release(in.sandbox, in.dir), os.RemoveAll(in.dir))
	if err != nil {
		a.log.Warn("migration: remove an incoming VM", "migration", key, "err", err)
	}
}

// send starts the source's part, once: the entry stays until the
// migration has ended or is gone (a stream is never sent twice).
func (a *Agent) send(m *v1alpha1.Migration) {
	key := types.NamespacedName{Namespace: m.Namespace, Name: m.Name}
	a.moves.mu.Lock()
	defer a.moves.mu.Unlock()
	if _, ok := a.moves.out[key]; ok {
		return
	}
	ctx, cancel := context.WithCancel(a.ctx)
	a.moves.out[key] = cancel
	m = m.DeepCopy()
	go func() {
		defer cancel()
		start := time.Now()
		stats, run, err := a.migrateOut(ctx, m)
		if err != nil {
			a.log.Info("migration failed at the source", "migration", key, "err", err)
			if st, serr := shim.ReadState(run); run != "" && serr == nil && st.Reason == "Migrated" {
				// Handed over all the same (an error after the switch):
				// the target says how it ended.
				return
			}
			if ctx.Err() == nil { // not cancelled: the migration is still there
				_ = a.migrationFailed(a.ctx, m, "TransferFailed", err)
			}
			return
		}
		a.log.Info("migration: sent", "migration", key, "took", time.Since(start), "downtime", stats.Downtime, "bytes", stats.Bytes)
		err = a.updateMigration(a.ctx, m, func(st *v1alpha1.MigrationStatus) {
			st.DowntimeMillis, st.TotalMillis = stats.Downtime.Milliseconds(), stats.Total.Milliseconds()
			st.Bytes, st.Rounds = stats.Bytes, stats.Rounds
		})
		if err != nil {
			a.log.Warn("migration: report the transfer", "migration", key, "err", err)
		}
	}()
}

func (a *Agent) cancelOutgoing(key types.NamespacedName) {
	a.moves.mu.Lock()
	cancel := a.moves.out[key]
	delete(a.moves.out, key)
	a.moves.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// migrateOut connects to the target and has the sandbox's shim send its
// VM over the connection; it returns the shim's run directory too.
func (a *Agent) migrateOut(ctx context.Context, m *v1alpha1.Migration) (stats vmm.MigrateStats, run string, err error) {
	var sb v1alpha1.Sandbox
	if err := a.client.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.Sandbox}, &sb); err != nil {
		return stats, "", err
	}
	if sb.UID != m.Status.SandboxUID {
		return stats, "", fmt.Errorf("sandbox %s is not the one the migration began with", sb.Name)
	}
	dir := a.sandboxDir(sb.UID)
	runs, err := listRuns(dir)
	if err != nil || len(runs) == 0 {
		return stats, "", fmt.Errorf("sandbox %s has no run on this host: %v", sb.Name, err)
	}
	run = runDir(dir, runs[len(runs)-1])
	// Which migration this run hands over to, should it (movedAway, and
	// its log's reader).
	if err := os.WriteFile(filepath.Join(run, migrationFile), []byte(m.UID), 0o600); err != nil {
		return stats, "", err
	}
	var target v1alpha1.Host
	if err := a.net.all.Get(ctx, types.NamespacedName{Name: m.Status.TargetHost}, &target); err != nil {
		return stats, run, fmt.Errorf("target host: %w", err)
	}
	conn, err := a.dialMigration(ctx, &target, m.UID)
	if err != nil {
		return stats, run, err
	}
	send, local, err := vmm.StreamFileConn()
	if err != nil {
		conn.Close()
		return stats, run, err
	}
	relayed := make(chan struct{})
	go func() {
		defer close(relayed)
		relay(conn, local)
	}()
	stats, err = shim.Migrate(ctx, run, send, shim.MigrateOptions{})
	// The stream is over either way. Once the shim and its VMM have let go
	// of their copies of the socket, the relay reads its end, having
	// passed on every byte (the handover's word among them), and ends.
	send.Close()
	select {
	case <-relayed:
	case <-time.After(5 * time.Second):
		conn.Close()
		local.Close()
	}
	return stats, run, err
}

// relay copies between a and b both ways until either direction ends (a
// migration's stream is over when one side stops: neither half-closes),
// then closes both.
func relay(a, b io.ReadWriteCloser) {
	var once sync.Once
	closeBoth := func() { once.Do(func() { a.Close(); b.Close() }) }
	var wg sync.WaitGroup
	pipe := func(dst, src io.ReadWriteCloser) {
		defer wg.Done()
		defer closeBoth()
		_, _ = io.Copy(dst, src)
	}
	wg.Add(2)
	go pipe(a, b)
	go pipe(b, a)
	wg.Wait()
}

// dialMigration connects to the target host's stream server for the
// stream of migration uid: TLS with this node's certificate, to a server
// whose certificate from the streams CA names the target node.
func (a *Agent) dialMigration(ctx context.Context, target *v1alpha1.Host, uid types.UID) (io.ReadWriteCloser, error) {
	addr, cfg, err := a.nodeTLS(target)
	if err != nil {
		return nil, err
	}
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second}, Config: cfg}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", target.Name, err)
	}
	tc := c.(*tls.Conn)
	_ = tc.SetDeadline(time.Now().Add(30 * time.Second))
	fmt.Fprintf(tc, "POST %s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: %s\r\nContent-Length: 0\r\n\r\n",
		v1alpha1.NodeMigrationPath(string(uid)), addr, upgradeMigration)
	br := bufio.NewReader(tc)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		tc.Close()
		return nil, fmt.Errorf("%s: %w", target.Name, err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		tc.Close()
		return nil, fmt.Errorf("%s refused the stream: %s: %s", target.Name, resp.Status, strings.TrimSpace(string(msg)))
	}
	_ = tc.SetDeadline(time.Time{}) // the sandbox layers bound every wait from here
	return &bufferedConn{tc, br}, nil
}

// nodeTLS is how this node agent calls another's stream server: its
// address, and TLS with this node's certificate to a server whose
// certificate from the streams CA names that node (HTTP/1.1: a
// migration's stream is an upgrade).
func (a *Agent) nodeTLS(peer *v1alpha1.Host) (string, *tls.Config, error) {
	addr := peer.Status.Address
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return "", nil, fmt.Errorf("host %s has no stream address (%q)", peer.Name, addr)
	}
	cert, err := tls.LoadX509KeyPair(a.cfg.Serving.CertFile, a.cfg.Serving.KeyFile)
	if err != nil {
		return "", nil, err
	}
	return addr, &tls.Config{
		Certificates: []tls.Certificate{cert}, RootCAs: a.cfg.CA.Pool(), ServerName: host, MinVersion: tls.VersionTLS12,
		NextProtos: []string{"http/1.1"}, VerifyConnection: pki.IsNode(peer.Name),
	}, nil
}

// bufferedConn reads through the reader that read its HTTP response.
type bufferedConn struct {
	*tls.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// peerNode is the node agent that made the request (its certificate from
// the streams CA names it); anyone else is refused.
func peerNode(w http.ResponseWriter, r *http.Request) (string, bool) {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 {
		http.Error(w, "a node's certificate is needed", http.StatusForbidden)
		return "", false
	}
	peer := r.TLS.VerifiedChains[0][0]
	name, ok := strings.CutPrefix(peer.Subject.CommonName, pki.NodeUserPrefix)
	if !ok || name == "" || isAPIServer(peer) {
		http.Error(w, "only a node agent may call this", http.StatusForbidden)
		return "", false
	}
	return name, true
}

// serveMigrationLog gives the target of a migration from this host the
// log of the sandbox's run here, once that run has handed over: the
// target keeps it as its run's rotated part, so that the sandbox's log
// reads on across the move.
func (a *Agent) serveMigrationLog(w http.ResponseWriter, r *http.Request) {
	from, ok := peerNode(w, r)
	if !ok {
		return
	}
	m, err := a.migrationByUID(r.Context(), r.PathValue("uid"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	refuse := func() {
		http.Error(w, fmt.Sprintf("no migration %s from this host to %s has handed over", r.PathValue("uid"), from), http.StatusForbidden)
	}
	if m == nil || m.Status.SourceHost != a.cfg.Name || m.Status.TargetHost != from ||
		(m.Status.Phase != v1alpha1.MigrationCopying && m.Status.Phase != v1alpha1.MigrationSucceeded) {
		refuse()
		return
	}
	dir := a.sandboxDir(m.Status.SandboxUID)
	runs, err := listRuns(dir)
	if err != nil || len(runs) == 0 {
		refuse()
		return
	}
	n := runs[len(runs)-1]
	run := runDir(dir, n)
	// Only the run that this migration sent.
	if b, err := os.ReadFile(filepath.Join(run, migrationFile)); err != nil || string(b) != string(m.UID) {
		refuse()
		return
	}
	// Its last output is in the log once its shim has ended.
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	for shim.Alive(run) && ctx.Err() == nil {
		time.Sleep(50 * time.Millisecond)
	}
	if st, err := shim.ReadState(run); err != nil || st.Reason != "Migrated" {
		http.Error(w, "the sandbox's run here has not handed over", http.StatusConflict)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	if err := logfile.Read(ctx, logPath(dir, n), w, false, nil); err != nil {
		a.log.Debug("serve a migrated sandbox's log", "err", err)
	}
}

// fetchLog puts the log of the sandbox's run on the migration's source
// before this host's (the part of it the log's cap keeps) as the rotated
// part of its run's log here.
func (a *Agent) fetchLog(ctx context.Context, m *v1alpha1.Migration, logPath string) error {
	var source v1alpha1.Host
	if err := a.net.all.Get(ctx, types.NamespacedName{Name: m.Status.SourceHost}, &source); err != nil {
		return err
	}
	addr, cfg, err := a.nodeTLS(&source)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+addr+v1alpha1.NodeMigrationLogPath(string(m.UID)), nil)
	if err != nil {
		return err
	}
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}
	defer c.CloseIdleConnections()
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return fmt.Errorf("%s: %s: %s", source.Name, resp.Status, strings.TrimSpace(string(msg)))
	}
	// At most the cap's worth, the newest: the source's agent is trusted
	// no more than its log's cap.
	max := a.cfg.LogMax
	b, err := io.ReadAll(io.LimitReader(resp.Body, 2*max))
	if err != nil {
		return err
	}
	if int64(len(b)) > max {
		b = b[int64(len(b))-max:]
	}
	return os.WriteFile(logPath+".1", b, 0o640)
}

// serveMigration takes a migration's stream from the source's node agent:
// only the node the migration comes from, once.
func (a *Agent) serveMigration(w http.ResponseWriter, r *http.Request) {
	from, ok := peerNode(w, r)
	if !ok {
		return
	}
	if !strings.EqualFold(r.Header.Get("Upgrade"), upgradeMigration) {
		http.Error(w, "want Upgrade: "+upgradeMigration, http.StatusBadRequest)
		return
	}
	stream, err := a.moves.take(types.UID(r.PathValue("uid")), from)
	if err != nil {
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		stream.Close()
		http.Error(w, "the connection cannot be taken over", http.StatusInternalServerError)
		return
	}
	c, brw, err := hj.Hijack()
	if err != nil {
		stream.Close()
		return
	}
	_ = c.SetDeadline(time.Time{})
	fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n", upgradeMigration)
	if err := brw.Flush(); err != nil {
		c.Close()
		stream.Close()
		return
	}
	a.log.Info("migration: stream from the source", "from", from)
	relay(&bufferedConn{c.(*tls.Conn), brw.Reader}, stream)
}

// migrationFile, in a run directory, names the migration (its UID) the
// run was sent by.
const migrationFile = "migration"

// sentBy is the migration that run was sent by, if it still exists.
func (a *Agent) sentBy(ctx context.Context, run string) (*v1alpha1.Migration, error) {
	b, err := os.ReadFile(filepath.Join(run, migrationFile))
	if err != nil {
		return nil, err
	}
	return a.migrationByUID(ctx, string(b))
}

// migrationByUID is the migration with uid (nil: none), from the cache.
func (a *Agent) migrationByUID(ctx context.Context, uid string) (*v1alpha1.Migration, error) {
	var list v1alpha1.MigrationList
	if err := a.client.List(ctx, &list); err != nil {
		return nil, err
	}
	for i := range list.Items {
		if string(list.Items[i].UID) == uid {
			return &list.Items[i], nil
		}
	}
	return nil, nil
}

// movedAway reports whether the sandbox whose run ended Migrated runs on
// another host now: the migration that run was sent by has not failed
// (it succeeded, or is about to). Else the sandbox runs nowhere, and is
// handled as a run that ended.
func (a *Agent) movedAway(ctx context.Context, run string) bool {
	m, err := a.sentBy(ctx, run)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return true // when in doubt, wait
	}
	return m != nil && m.Status.Phase != v1alpha1.MigrationFailed
}

// migrationFailed ends a migration with a reason (unless it has ended).
func (a *Agent) migrationFailed(ctx context.Context, m *v1alpha1.Migration, reason string, err error) error {
	return a.updateMigration(ctx, m, func(st *v1alpha1.MigrationStatus) {
		if !st.Phase.Terminal() {
			now := metav1.Now()
			st.Phase, st.Reason, st.Message, st.CompletedAt = v1alpha1.MigrationFailed, reason, shim.ClipMessage(err.Error()), &now
		}
	})
}

// updateMigration applies change to the migration's latest status.
func (a *Agent) updateMigration(ctx context.Context, m *v1alpha1.Migration, change func(*v1alpha1.MigrationStatus)) error {
	key := types.NamespacedName{Namespace: m.Namespace, Name: m.Name}
	return client.IgnoreNotFound(retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		var cur v1alpha1.Migration
		if err := a.reader.Get(ctx, key, &cur); err != nil {
			return err
		}
		if cur.UID != m.UID {
			return nil
		}
		was := cur.Status.DeepCopy()
		change(&cur.Status)
		if equality.Semantic.DeepEqual(was, &cur.Status) {
			return nil
		}
		return a.client.Status().Update(ctx, &cur)
	}))
}
