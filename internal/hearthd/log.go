package hearthd

import (
	"context"
	"log/slog"

	"github.com/go-logr/logr"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime"
)

func logrFrom(log *slog.Logger) logr.Logger { return logr.FromSlogHandler(log.Handler()) }

// RouteKlog sends the Kubernetes libraries' klog output to log. klog's
// informational chatter (request logs, cache syncs) is shown only with
// debug logging: at V(2) and above klog calls are dropped.
func RouteKlog(log *slog.Logger) {
	min := slog.LevelWarn
	if log.Enabled(context.Background(), slog.LevelDebug) {
		min = slog.LevelInfo
	}
	quiet := slog.New(minLevel{log.Handler(), min}).With("component", "k8s")
	klog.SetSlogLogger(quiet)
	ctrl.SetLogger(logr.FromSlogHandler(quiet.Handler()))
}

// minLevel drops records below its level.
type minLevel struct {
	slog.Handler
	min slog.Level
}

func (h minLevel) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= h.min && h.Handler.Enabled(ctx, l)
}

func (h minLevel) WithAttrs(a []slog.Attr) slog.Handler {
	return minLevel{h.Handler.WithAttrs(a), h.min}
}
func (h minLevel) WithGroup(n string) slog.Handler { return minLevel{h.Handler.WithGroup(n), h.min} }
