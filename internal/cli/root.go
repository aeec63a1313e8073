// Package cli is the hearth command line (cobra): run, image, version and
// bench. Each command is a thin layer over internal/sandbox and
// internal/image.
package cli

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/image"
)

// ExitError carries a process exit status out of a command.
type ExitError struct {
	Code int
	Msg  string // printed as "hearth: Msg" when set
}

func (e *ExitError) Error() string { return fmt.Sprintf("exit status %d", e.Code) }

// Exit codes of hearth itself, as docker's.
const (
	ExitHearth = 125
)

// Version is set by main from the build.
var Version = "dev"

type globals struct {
	logLevel        string
	insecure        []string
	registryTimeout time.Duration
	kubeconfigPath  string
	namespace       string
	log             *slog.Logger
}

// Main runs the CLI with args and returns the process exit status.
func Main(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	g := &globals{}
	root := &cobra.Command{
		Use:   "hearth",
		Short: "Run untrusted code in hardware-isolated micro-VMs",
		Long: `hearth boots a micro-VM from an OCI image and runs a command in it.

Each sandbox gets its own guest kernel, a read-only copy of the image and a
private writable disk. hearth uses KVM where the host has it and QEMU's TCG
emulation elsewhere (TCG is not a security boundary).

Files: the cache (guest kernel, converted images) is under $HEARTH_CACHE,
else ~/.cache/hearth; live VMs keep their sockets and disks under
$HEARTH_RUN_DIR, else /run/hearth.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(*cobra.Command, []string) error {
			return g.setupLog(stderr)
		},
	}
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	pf := root.PersistentFlags()
	pf.StringVar(&g.logLevel, "log-level", "warn", "log level: debug, info, warn or error")
	pf.StringSliceVar(&g.insecure, "insecure-registry", nil, "reach this registry (host:port) over plain HTTP; localhost always is")
	pf.DurationVar(&g.registryTimeout, "registry-timeout", 30*time.Second, "give up on a registry that does not answer within this time")

	pf.StringVar(&g.kubeconfigPath, "kubeconfig", "", "the hearth API's kubeconfig (default $KUBECONFIG); with one, run goes through the API")
	pf.StringVar(&g.namespace, "namespace", "", "the API namespace (default: the kubeconfig's, else default)")

	root.AddCommand(runCmd(g), imageCmd(g), VersionCmd(), benchCmd(g), upCmd(g),
		psCmd(g), getCmd(g), logsCmd(g), execCmd(g), rmCmd(g), hostCmd(g), snapshotCmd(g), migrateCmd(g), userCmd(g), tokenCmd(g))
	return Finish(root.Execute(), stderr)
}

func (g *globals) setupLog(stderr io.Writer) (err error) {
	g.log, err = NewLogger(g.logLevel, stderr)
	return err
}

// NewLogger logs at level (debug, info, warn or error; from --log-level)
// to w.
func NewLogger(level string, w io.Writer) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", level, err)
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: lvl})), nil
}

// Finish turns a command's error into an exit status, printing it.
func Finish(err error, stderr io.Writer) int {
	if err == nil {
		return 0
	}
	var ee *ExitError
	if errors.As(err, &ee) {
		if ee.Msg != "" {
			fmt.Fprintf(stderr, "hearth: %s\n", ee.Msg)
		}
		return ee.Code
	}
	fmt.Fprintf(stderr, "hearth: %v\n", err)
	return ExitHearth
}

func (g *globals) store(progress io.Writer) *image.Store {
	return &image.Store{
		Dir:      config.ImageDir(),
		Source:   image.SourceOptions{Insecure: g.insecure, Timeout: g.registryTimeout, Keychain: authn.DefaultKeychain},
		Progress: progress,
		Log:      g.log,
	}
}

// terminalOr returns w if it is a terminal, else nil: progress bars are for
// people, not for pipes and logs.
func terminalOr(w io.Writer) io.Writer {
	if f, ok := w.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		return w
	}
	return nil
}

// VersionCmd prints the version.
func VersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print hearth's version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			v := Version
			if bi, ok := debug.ReadBuildInfo(); ok && v == "dev" {
				for _, s := range bi.Settings {
					if s.Key == "vcs.revision" {
						v += "+" + s.Value[:min(12, len(s.Value))]
					}
				}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "hearth %s\n", v)
			return nil
		},
	}
}
