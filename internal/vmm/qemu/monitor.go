package qemu

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/digitalocean/go-qemu/qmp"

	"hearth.dev/hearth/internal/vmm"
)

// monitor is a QMP connection: the VM's own (qmp.sock, held by the
// process that started it) or a passing one (control.sock).
type monitor struct {
	*qmp.SocketMonitor
	// done closes when QEMU exits, and exitErr is then how, where this
	// process started it; nil otherwise.
	done    <-chan struct{}
	exitErr func() error
}

func dialMonitor(path string) (*monitor, error) {
	mon, err := qmp.NewSocketMonitor("unix", path, 5*time.Second)
	if err != nil {
		return nil, err
	}
	if err := mon.Connect(); err != nil {
		return nil, err
	}
	return &monitor{SocketMonitor: mon}, nil
}

// qmp runs a QMP command with arguments and decodes its return value
// into ret (if not nil).
func (m *monitor) qmp(cmd string, args any, ret any) error {
	return m.qmpFile(cmd, args, ret, nil)
}

// qmpFile is qmp passing a file descriptor with the command (getfd).
func (m *monitor) qmpFile(cmd string, args any, ret any, f *os.File) error {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	var raw []byte
	if f != nil {
		raw, err = m.RunWithFile(b, f)
	} else {
		raw, err = m.Run(b)
	}
	if err != nil {
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	if ret == nil {
		return nil
	}
	var resp struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(raw, &resp); err != nil {
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	return json.Unmarshal(resp.Return, ret)
}

// status is QEMU's run state: running, paused, inmigrate, postmigrate...
func (m *monitor) status() (string, error) {
	var st struct {
		Status string `json:"status"`
	}
	err := m.qmp("query-status", nil, &st)
	return st.Status, err
}

func (m *monitor) version() (string, error) {
	var ver struct {
		QEMU struct {
			Major, Minor, Micro int
		} `json:"qemu"`
		Package string `json:"package"`
	}
	if err := m.qmp("query-version", nil, &ver); err != nil {
		return "", err
	}
	return fmt.Sprintf("%d.%d.%d %s", ver.QEMU.Major, ver.QEMU.Minor, ver.QEMU.Micro, ver.Package), nil
}

// setCapabilities sets QEMU's migration capabilities, which stay set in
// the process for its next migration: each kind of migration sets every
// one it depends on.
func (m *monitor) setCapabilities(caps map[string]bool) error {
	list := make([]map[string]any, 0, len(caps))
	for c, on := range caps {
		list = append(list, map[string]any{"capability": c, "state": on})
	}
	return m.qmp("migrate-set-capabilities", map[string]any{"capabilities": list}, nil)
}

// ignoreShared leaves shared RAM (the memory file) out of the migration
// stream: it is saved, or mapped, as the file itself. A snapshot is
// stop-and-copy: none of a live migration's capabilities (MigrateOut's,
// left behind by one that failed) and no bandwidth cap.
func (m *monitor) ignoreShared() error {
	if err := m.setCapabilities(map[string]bool{"x-ignore-shared": true,
		"auto-converge": false, "pause-before-switchover": false, "zero-blocks": false}); err != nil {
		return err
	}
	return m.qmp("migrate-set-parameters", map[string]any{"max-bandwidth": int64(1 << 40)}, nil)
}

// waitMigration polls the migration until it reaches want, or fails.
func (m *monitor) waitMigration(ctx context.Context, want string) error {
	for {
		var st struct {
			Status      string `json:"status"`
			ErrorString string `json:"error-desc"`
		}
		if err := m.qmp("query-migrate", nil, &st); err != nil {
			return err
		}
		switch st.Status {
		case want:
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("migration %s: %s", st.Status, st.ErrorString)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-m.done: // nil where this process did not start QEMU
			return fmt.Errorf("%w during migration: %v", vmm.ErrExited, m.exitErr())
		case <-time.After(2 * time.Millisecond):
		}
	}
}
