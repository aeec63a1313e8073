package node

import (
	"context"
	"os"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/event"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/shim"
)

// watches polls the state files of live runs (a stat every 10 ms) and
// wakes the sandbox's reconcile when one changes or its shim ends, so that
// status follows a run within tens of milliseconds without the shim
// having to reach the agent (which may be restarting).
type watches struct {
	wake chan<- event.GenericEvent
	mu   sync.Mutex
	runs map[types.UID]watch
}

type watch struct {
	dir    string
	cancel context.CancelFunc
}

func newWatches(wake chan<- event.GenericEvent) *watches {
	return &watches{wake: wake, runs: map[types.UID]watch{}}
}

// ensure watches runDir for sb, replacing a watch of an older run.
func (w *watches) ensure(sb *v1alpha1.Sandbox, runDir string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if cur, ok := w.runs[sb.UID]; ok {
		if cur.dir == runDir {
			return
		}
		cur.cancel()
	}
	ctx, cancel := context.WithCancel(context.Background())
	w.runs[sb.UID] = watch{dir: runDir, cancel: cancel}
	obj := &v1alpha1.Sandbox{}
	obj.Namespace, obj.Name, obj.UID = sb.Namespace, sb.Name, sb.UID
	go w.poll(ctx, obj, runDir)
}

func (w *watches) poll(ctx context.Context, obj *v1alpha1.Sandbox, runDir string) {
	var last time.Time
	state := shim.StatePath(runDir)
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Millisecond):
		}
		alive := shim.Alive(runDir)
		changed := false
		if fi, err := os.Stat(state); err == nil && !fi.ModTime().Equal(last) {
			last, changed = fi.ModTime(), true
		}
		if changed || !alive {
			select {
			case w.wake <- event.GenericEvent{Object: obj}:
			case <-ctx.Done():
				return
			}
		}
		if !alive {
			w.mu.Lock()
			if cur, ok := w.runs[obj.UID]; ok && cur.dir == runDir {
				delete(w.runs, obj.UID)
			}
			w.mu.Unlock()
			return
		}
	}
}

func (w *watches) drop(uid types.UID) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if cur, ok := w.runs[uid]; ok {
		cur.cancel()
		delete(w.runs, uid)
	}
}

func (w *watches) stopAll() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for uid, cur := range w.runs {
		cur.cancel()
		delete(w.runs, uid)
	}
}
