package hearthd

import (
	"context"
	"log/slog"

	"github.com/spf13/pflag"
	"k8s.io/client-go/rest"
)

// NodeOptions configure the node agent.
type NodeOptions struct {
	Name string
}

// AddFlags registers the node agent's flags.
func (o *NodeOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Name, "node-name", "", "this host's name in the API (default: the hostname)")
}

func startNode(ctx context.Context, log *slog.Logger, dataDir string, o Options, cfg *rest.Config, run func(string, func(context.Context) error)) error {
	return nil
}
