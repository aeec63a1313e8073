package node

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/logfile"
	"hearth.dev/hearth/internal/pki"
	"hearth.dev/hearth/internal/shim"
)

// serveStreams serves the sandboxes' streams to the API server: HTTPS
// with a certificate from hearth's streams CA, and only to clients whose
// certificate from the same CA says they are an API server; and the
// streams of migrations to this host to the source's node agent
// (serveMigration).
func (a *Agent) serveStreams(ctx context.Context) error {
	cert, err := tls.LoadX509KeyPair(a.cfg.Serving.CertFile, a.cfg.Serving.KeyFile)
	if err != nil {
		return fmt.Errorf("stream server certificate: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /sandboxes/{ns}/{name}/log", a.serveLog)
	mux.HandleFunc("/sandboxes/{ns}/{name}/exec", a.serveRemoteCommand(false))
	mux.HandleFunc("/sandboxes/{ns}/{name}/attach", a.serveRemoteCommand(true))
	// A migration's stream comes from the source's node agent, the rest
	// from API servers.
	root := http.NewServeMux()
	root.Handle("/", onlyAPIServers(mux))
	root.HandleFunc("POST /migrations/{uid}/stream", a.serveMigration)
	root.HandleFunc("GET /migrations/{uid}/log", a.serveMigrationLog)
	srv := &http.Server{
		Handler: root,
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{cert},
			ClientAuth:   tls.RequireAndVerifyClientCert,
			ClientCAs:    a.cfg.CA.Pool(),
			MinVersion:   tls.VersionTLS12,
		},
		ReadHeaderTimeout: 10 * time.Second,
	}
	ln, err := net.Listen("tcp", a.cfg.Listen)
	if err != nil {
		return fmt.Errorf("stream server: %w", err)
	}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func onlyAPIServers(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || !isAPIServer(r.TLS.VerifiedChains[0][0]) {
			http.Error(w, "only the API server may call a node agent", http.StatusForbidden)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func isAPIServer(c *x509.Certificate) bool {
	return slices.Contains(c.Subject.Organization, pki.GroupAPIServer)
}

// sandbox finds the sandbox of a stream request and its directory.
func (a *Agent) sandbox(w http.ResponseWriter, r *http.Request) (*v1alpha1.Sandbox, string, bool) {
	var sb v1alpha1.Sandbox
	key := types.NamespacedName{Namespace: r.PathValue("ns"), Name: r.PathValue("name")}
	if err := a.client.Get(r.Context(), key, &sb); err != nil {
		http.Error(w, fmt.Sprintf("sandbox %s: %v", key, err), http.StatusNotFound)
		return nil, "", false
	}
	return &sb, a.sandboxDir(sb.UID), true
}

// serveLog writes a run's output: the current (or, with previous=true,
// the one before) and, with follow=true, what it writes until it ends.
func (a *Agent) serveLog(w http.ResponseWriter, r *http.Request) {
	sb, dir, ok := a.sandbox(w, r)
	if !ok {
		return
	}
	runs, err := listRuns(dir)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	q := r.URL.Query()
	follow, _ := strconv.ParseBool(q.Get("follow"))
	previous, _ := strconv.ParseBool(q.Get("previous"))
	i := len(runs) - 1
	if previous {
		i--
	}
	if i < 0 {
		if previous {
			http.Error(w, fmt.Sprintf("sandbox %s/%s has no previous run", sb.Namespace, sb.Name), http.StatusBadRequest)
			return
		}
		if !follow {
			return // not started yet: no output
		}
		http.Error(w, fmt.Sprintf("sandbox %s/%s has not started yet", sb.Namespace, sb.Name), http.StatusBadRequest)
		return
	}
	run := runDir(dir, runs[i])
	w.Header().Set("Content-Type", "text/plain")
	w.Header().Set("Transfer-Encoding", "chunked")
	done := func() bool { return !shim.Alive(run) }
	out := flushWriter{w: w, rc: http.NewResponseController(w)}
	if err := logfile.Read(r.Context(), logPath(dir, runs[i]), out, follow && !previous, done); err != nil {
		a.log.Debug("serve log", "err", err)
	}
}

type flushWriter struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func (f flushWriter) Write(p []byte) (int, error) { return f.w.Write(p) }
func (f flushWriter) Flush()                      { _ = f.rc.Flush() }
