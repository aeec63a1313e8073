package jail

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// lease takes a uid of the range that no other VM holds: a file per uid in
// LeaseDir, flock-held by the caller for the VM's life. The kernel drops
// the lock when the holder exits, however it exits, so a crashed shim's
// uid comes back by itself (its VMM died with it: the parent-death signal,
// and the sweep of its cgroup).
func (o *Options) lease() (int, *os.File, error) {
	r := o.UIDs
	if r.Count <= 0 {
		r = DefaultRange
	}
	if err := os.MkdirAll(o.LeaseDir, 0o700); err != nil {
		return 0, nil, fmt.Errorf("jail uid leases: %w", err)
	}
	// From a random place in the range: concurrent starts rarely try the
	// same uid first.
	start := rand.IntN(r.Count)
	for i := range r.Count {
		uid := r.First + (start+i)%r.Count
		f, err := os.OpenFile(filepath.Join(o.LeaseDir, strconv.Itoa(uid)), os.O_CREATE|os.O_RDWR|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return 0, nil, fmt.Errorf("jail uid lease: %w", err)
		}
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return uid, f, nil
		}
		f.Close()
		if !errors.Is(err, unix.EWOULDBLOCK) {
			return 0, nil, fmt.Errorf("jail uid lease: %w", err)
		}
	}
	return 0, nil, fmt.Errorf("jail: all %d uids from %d are in use by other VMs (set a larger range with $HEARTH_JAIL_UIDS)", r.Count, r.First)
}
