// Package bench measures hearth against a bare VMM on the same host, in the
// same run, and reports ratios: absolute times on a shared machine drift,
// ratios much less.
package bench

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"hearth.dev/hearth/internal/guest/protocol"
	"hearth.dev/hearth/internal/image"
	"hearth.dev/hearth/internal/imagebuild"
	"hearth.dev/hearth/internal/initramfs"
	"hearth.dev/hearth/internal/jail"
	"hearth.dev/hearth/internal/sandbox"
	"hearth.dev/hearth/internal/vmm"
	"hearth.dev/hearth/internal/vmm/qemu"
)

// BootOptions configures the boot benchmark.
type BootOptions struct {
	N         int
	Hearth    string // the hearth binary to time
	Env       []string
	Kernel    string
	Initrd    string // hearth's own initramfs (the agent), for the bare boot
	Accel     vmm.Accel
	MemoryMiB int
	WorkDir   string // scratch space; removed by the caller
	Images    *image.Store
	Out       io.Writer
	// Jail, if set, is how hearth jails its VMMs: the bare boot is timed
	// in the jail too, and the difference is the jail's cost.
	Jail *jail.Options
}

// BootResult is the benchmark's summary, printed as its last line. "bare"
// is QEMU booting the same kernel, devices and hearth's own initramfs, whose
// agent powers off as soon as it runs (docs/design.md's baseline); "bare_busybox"
// is QEMU with no disks and a busybox initramfs whose /init powers off.
type BootResult struct {
	N               int     `json:"n"`
	Accel           string  `json:"accel"`
	P50ms           float64 `json:"p50_ms"`
	P90ms           float64 `json:"p90_ms"`
	BareP50ms       float64 `json:"bare_p50_ms"`
	BareP90ms       float64 `json:"bare_p90_ms"`
	Ratio           float64 `json:"ratio"`
	BusyboxP50ms    float64 `json:"bare_busybox_p50_ms"`
	BusyboxRatio    float64 `json:"ratio_busybox"`
	JailedP50ms     float64 `json:"bare_jailed_p50_ms,omitempty"`
	JailCostms      float64 `json:"jail_cost_ms,omitempty"` // jailed bare p50 − bare p50
	FirstGetms      float64 `json:"first_get_ms"`
	FirstConverted  bool    `json:"first_get_converted"`
	SecondGetms     float64 `json:"second_get_ms"`
	SecondConverted bool    `json:"second_get_converted"`
	VMMRSSMiB       float64 `json:"vmm_rss_mib"`
	GuestRSSMiB     float64 `json:"guest_ram_touched_mib"`
	OverheadMiB     float64 `json:"vmm_private_overhead_mib"`
	SharedMiB       float64 `json:"vmm_shared_file_mib"`
}

// Boot times N runs of `hearth run IMAGE true` and N bare QEMU boots of the
// same kernel with an initramfs that powers off at once, interleaved so that
// both see the same machine load.
func Boot(ctx context.Context, o BootOptions) (*BootResult, error) {
	res := &BootResult{N: o.N, Accel: string(o.Accel)}
	layoutDir := filepath.Join(o.WorkDir, "image")
	base, err := imagebuild.Busybox()
	if err != nil {
		return nil, err
	}
	img, err := imagebuild.Image(v1.Config{Cmd: []string{"true"}}, base)
	if err != nil {
		return nil, err
	}
	if err := imagebuild.WriteLayout(layoutDir, "bench", img); err != nil {
		return nil, err
	}
	ref := "oci:" + layoutDir + ":bench"

	// Conversion happens once: the second get finds the converted image.
	t0 := time.Now()
	first, err := o.Images.Get(ctx, ref, image.PullMissing)
	if err != nil {
		return nil, err
	}
	res.FirstGetms, res.FirstConverted = ms(time.Since(t0)), first.Converted
	t0 = time.Now()
	second, err := o.Images.Get(ctx, ref, image.PullMissing)
	if err != nil {
		return nil, err
	}
	res.SecondGetms, res.SecondConverted = ms(time.Since(t0)), second.Converted
	fmt.Fprintf(o.Out, "image: first get %.1f ms (converted=%v), second get %.1f ms (converted=%v)\n",
		res.FirstGetms, first.Converted, res.SecondGetms, second.Converted)

	busybox, err := busyboxInitrd(o.WorkDir)
	if err != nil {
		return nil, err
	}
	// The bare boot of hearth's initramfs gets the same devices as a
	// sandbox (the image and a writable disk), so that the difference is
	// hearth's own work, not the device model's.
	disk := filepath.Join(o.WorkDir, "disk.ext4")
	if err := sandbox.MakeDisk(ctx, disk, 1024); err != nil {
		return nil, err
	}
	drives := []vmm.Drive{
		{ID: "image", Path: second.RootFS, ReadOnly: true, Serial: "image"},
		{ID: "rw", Path: disk, Serial: "rw"},
	}
	var hearth, bare, bareBusybox, jailed []time.Duration
	for i := 0; i < o.N; i++ {
		var j time.Duration
		if o.Jail != nil {
			if j, err = timeBare(ctx, o, o.Jail, o.Initrd, protocol.PowerOffEnv+"=1", drives); err != nil {
				return nil, err
			}
			jailed = append(jailed, j)
		}
		d, err := timeHearth(ctx, o, ref)
		if err != nil {
			return nil, err
		}
		b, err := timeBare(ctx, o, nil, o.Initrd, protocol.PowerOffEnv+"=1", drives)
		if err != nil {
			return nil, err
		}
		bb, err := timeBare(ctx, o, nil, busybox, "", nil)
		if err != nil {
			return nil, err
		}
		hearth, bare, bareBusybox = append(hearth, d), append(bare, b), append(bareBusybox, bb)
		fmt.Fprintf(o.Out, "run %2d: hearth run %5.0f ms   bare qemu, hearth initramfs %5.0f ms (jailed %5.0f ms)   bare qemu, busybox initramfs %5.0f ms\n",
			i+1, ms(d), ms(b), ms(j), ms(bb))
	}
	res.P50ms, res.P90ms = pct(hearth, 50), pct(hearth, 90)
	res.BareP50ms, res.BareP90ms = pct(bare, 50), pct(bare, 90)
	res.BusyboxP50ms = pct(bareBusybox, 50)
	if len(jailed) > 0 {
		res.JailedP50ms = pct(jailed, 50)
		res.JailCostms = round(res.JailedP50ms-res.BareP50ms, 1)
	}
	res.Ratio = round(res.P50ms/res.BareP50ms, 3)
	res.BusyboxRatio = round(res.P50ms/res.BusyboxP50ms, 3)

	if err := measureMemory(ctx, o, ref, res); err != nil {
		return nil, err
	}
	fmt.Fprintf(o.Out, "hearth run IMAGE true: p50 %.0f ms, p90 %.0f ms\n", res.P50ms, res.P90ms)
	fmt.Fprintf(o.Out, "bare QEMU, same kernel and initramfs: p50 %.0f ms, p90 %.0f ms; ratio %.2f\n", res.BareP50ms, res.BareP90ms, res.Ratio)
	fmt.Fprintf(o.Out, "bare QEMU, busybox initramfs: p50 %.0f ms; ratio %.2f\n", res.BusyboxP50ms, res.BusyboxRatio)
	if res.JailedP50ms > 0 {
		fmt.Fprintf(o.Out, "bare QEMU in hearth's jail: p50 %.0f ms: the jail adds %.1f ms\n", res.JailedP50ms, res.JailCostms)
	}
	fmt.Fprintf(o.Out, "memory: QEMU RSS %.1f MiB = guest RAM touched %.1f MiB + VMM private overhead %.1f MiB + shared file pages %.1f MiB\n",
		res.VMMRSSMiB, res.GuestRSSMiB, res.OverheadMiB, res.SharedMiB)
	return res, nil
}

func timeHearth(ctx context.Context, o BootOptions, ref string, extra ...string) (time.Duration, error) {
	args := append([]string{"run", "--local", "--memory", strconv.Itoa(o.MemoryMiB) + "M", "--accel", string(o.Accel), ref}, extra...)
	if len(extra) == 0 {
		args = append(args, "true")
	}
	cmd := exec.CommandContext(ctx, o.Hearth, args...)
	cmd.Env = o.Env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("hearth run: %w: %s", err, stderr.String())
	}
	return time.Since(start), nil
}

// busyboxInitrd writes an initramfs whose /init is busybox powering the VM off.
func busyboxInitrd(dir string) (string, error) {
	bb, err := os.ReadFile(imagebuild.BusyboxPath)
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, "bare.cpio")
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	return path, initramfs.WriteFiles(f, []initramfs.File{
		{Name: "busybox", Mode: 0o755, Body: bb},
		{Name: "init", Mode: 0o755, Body: []byte("#!/busybox sh\n/busybox reboot -f\n")},
	})
}

// timeBare boots QEMU through the same driver hearth uses (jailed if j is
// set), with no agent protocol: the guest powers itself off, and the time
// is until QEMU is gone.
func timeBare(ctx context.Context, o BootOptions, j *jail.Options, initrd, cmdline string, drives []vmm.Drive) (time.Duration, error) {
	run, err := os.MkdirTemp(o.WorkDir, "bare-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(run)
	start := time.Now()
	vm, err := (&qemu.Driver{Binary: os.Getenv("HEARTH_QEMU"), Jail: j}).Start(ctx, vmm.Config{ID: "bare", RunDir: run, Kernel: o.Kernel,
		Initrd: initrd, Cmdline: cmdline, VCPUs: 1, MemoryMiB: o.MemoryMiB, Accel: o.Accel, Channel: protocol.ChannelName, Drives: drives})
	if err != nil {
		return 0, fmt.Errorf("bare qemu: %w", err)
	}
	defer vm.Kill()
	if err := vm.Wait(ctx); err != nil {
		return 0, fmt.Errorf("bare qemu: %w\n%s", err, vm.Logs(2048))
	}
	return time.Since(start), nil
}

// measureMemory runs a sandbox that sleeps and reads its QEMU's memory:
// guest RAM is the one anonymous mapping of exactly the guest's size; the
// rest of the RSS is the VMM's own overhead.
func measureMemory(ctx context.Context, o BootOptions, ref string, res *BootResult) error {
	runRoot := ""
	for _, kv := range o.Env {
		if v, ok := strings.CutPrefix(kv, "HEARTH_RUN_DIR="); ok {
			runRoot = v
		}
	}
	done := make(chan error, 1)
	go func() {
		_, err := timeHearth(ctx, o, ref, "sh", "-c", "sleep 4")
		done <- err
	}()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		time.Sleep(500 * time.Millisecond)
		pids := vmm.Pids(runRoot)
		if len(pids) == 0 {
			continue
		}
		pid := pids[0]
		_, _, guest, err := smapsRSS(pid, int64(o.MemoryMiB)<<10)
		if err != nil || guest == 0 {
			continue
		}
		// Wait for the guest to be up (its kernel touches its memory).
		time.Sleep(2 * time.Second)
		total, anon, guest, err := smapsRSS(pid, int64(o.MemoryMiB)<<10)
		if err != nil {
			return err
		}
		res.VMMRSSMiB, res.GuestRSSMiB = round(float64(total)/1024, 1), round(float64(guest)/1024, 1)
		res.OverheadMiB = round(float64(anon-guest)/1024, 1)
		res.SharedMiB = round(float64(total-anon)/1024, 1)
		break
	}
	return <-done
}

// smapsRSS returns, in KiB, the process's total RSS, its anonymous (private)
// RSS, and the RSS of its guest RAM mapping (the anonymous mapping whose
// size is guestKiB). File-backed pages (QEMU's binary and libraries, the
// kernel and initramfs it maps) are in the page cache, shared by every VM.
func smapsRSS(pid int, guestKiB int64) (total, anon, guest int64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return 0, 0, 0, err
	}
	defer f.Close()
	var size int64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		n, _ := strconv.ParseInt(fields[1], 10, 64)
		switch fields[0] {
		case "Size:":
			size = n
		case "Rss:":
			total += n
		case "Anonymous:":
			anon += n
			if size == guestKiB {
				guest += n
			}
		}
	}
	return total, anon, guest, sc.Err()
}

func ms(d time.Duration) float64 { return round(float64(d)/float64(time.Millisecond), 1) }

func round(v float64, digits int) float64 {
	p := 1.0
	for i := 0; i < digits; i++ {
		p *= 10
	}
	return float64(int64(v*p+0.5)) / p
}

func pct(ds []time.Duration, p int) float64 {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := (len(s)*p + 99) / 100
	if i > 0 {
		i--
	}
	return ms(s[i])
}

// Summary is the result in the benchmarks' common shape.
func (r *BootResult) Summary() *Result {
	return &Result{Bench: "boot", N: r.N,
		Figure:  NewFigure("p50_ms", r.P50ms, "bare_qemu_p50_ms", r.BareP50ms, Lower, 1.2),
		More:    []Figure{NewFigure("p50_ms", r.P50ms, "bare_qemu_busybox_p50_ms", r.BusyboxP50ms, Lower, 0)},
		Details: r}
}
