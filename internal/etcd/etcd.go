// Package etcd runs hearth's embedded etcd member: the control plane's
// Raft-replicated store, one member by default, with its data under the
// hearthd data directory and clients authenticated by certificates from
// hearth's CA.
package etcd

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Config is one member.
type Config struct {
	Name    string
	DataDir string
	// ClientURL and PeerURL are where it listens (https://127.0.0.1:2379).
	ClientURL, PeerURL string
	// TLS: the member's serving certificate, which is also its peer
	// certificate, and the CA that signs its clients.
	CertFile, KeyFile, CAFile string
	// ClientCNs are the only client certificates it accepts, by common
	// name, besides its own: the CA signs users and nodes too, and etcd
	// has no authorization of its own (a user's certificate would be
	// root over all the cluster's state).
	ClientCNs []string
}

// memberCN is the common name of a member's own certificate.
const memberCN = "etcd"

// Member is a running etcd member.
type Member struct {
	e *embed.Etcd
}

// Start starts the member and waits until it serves.
func Start(ctx context.Context, log *slog.Logger, c Config) (*Member, error) {
	cfg := embed.NewConfig()
	cfg.Name = c.Name
	cfg.Dir = c.DataDir
	cu, err := url.Parse(c.ClientURL)
	if err != nil {
		return nil, fmt.Errorf("etcd client URL: %w", err)
	}
	pu, err := url.Parse(c.PeerURL)
	if err != nil {
		return nil, fmt.Errorf("etcd peer URL: %w", err)
	}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(c.Name)
	cfg.ClientTLSInfo.CertFile, cfg.ClientTLSInfo.KeyFile = c.CertFile, c.KeyFile
	cfg.ClientTLSInfo.TrustedCAFile, cfg.ClientTLSInfo.ClientCertAuth = c.CAFile, true
	cfg.PeerTLSInfo = cfg.ClientTLSInfo
	cfg.ClientTLSInfo.AllowedCNs = append([]string{memberCN}, c.ClientCNs...)
	cfg.PeerTLSInfo.AllowedCNs = []string{memberCN}
	// etcd's own zap logger: quiet unless something is wrong.
	cfg.LogLevel = "error"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	if log.Enabled(ctx, slog.LevelDebug) {
		cfg.ZapLoggerBuilder = nil
		cfg.LogLevel = "info"
	}
	// Sandboxes come and go: keep history short so the store stays small.
	cfg.AutoCompactionMode = "periodic"
	cfg.AutoCompactionRetention = "5m"
	// One member on a shared machine: a missed heartbeat under load must
	// not cost an election.
	cfg.TickMs, cfg.ElectionMs = 100, 2000
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("start etcd: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("etcd: %w", err)
	case <-time.After(time.Minute):
		e.Close()
		return nil, fmt.Errorf("etcd did not become ready within a minute")
	case <-ctx.Done():
		e.Close()
		return nil, ctx.Err()
	}
	log.Info("etcd ready", "data", c.DataDir, "client", c.ClientURL)
	return &Member{e: e}, nil
}

// Err reports a member failure after Start.
func (m *Member) Err() <-chan error { return m.e.Err() }

// Close stops the member.
func (m *Member) Close() { m.e.Close() }
