package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// MigrationSpec says which sandbox moves, and where to.
type MigrationSpec struct {
	// Sandbox is the running Sandbox (in this namespace) to move.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="sandbox is immutable"
	Sandbox string `json:"sandbox"`
	// TargetHost is the Host to move it to; empty: the scheduler picks
	// one (not the one it runs on).
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="targetHost is immutable"
	// +optional
	TargetHost string `json:"targetHost,omitempty"`
}

// MigrationPhase is where a migration is.
type MigrationPhase string

const (
	// MigrationPending: not started (waiting for a target, or for an
	// earlier migration of the same sandbox to end).
	MigrationPending MigrationPhase = "Pending"
	// MigrationPreparing: the target's node agent readies an incoming VM.
	MigrationPreparing MigrationPhase = "Preparing"
	// MigrationCopying: the source's node agent streams the VM to it.
	MigrationCopying   MigrationPhase = "Copying"
	MigrationSucceeded MigrationPhase = "Succeeded" // the sandbox runs on the target
	MigrationFailed    MigrationPhase = "Failed"    // the sandbox runs on where it was
)

// Terminal reports whether the migration has ended.
func (p MigrationPhase) Terminal() bool { return p == MigrationSucceeded || p == MigrationFailed }

// InFlight reports whether the migration holds room on its target for
// its sandbox: the target is chosen, and it has neither failed nor been
// bound there yet (until then the sandbox counts on its source too).
func (m *Migration) InFlight() bool {
	switch m.Status.Phase {
	case MigrationPreparing, MigrationCopying:
		return true
	case MigrationSucceeded:
		return !m.Status.Bound
	}
	return false
}

// MigrationStatus is what the control plane and the two hosts report.
type MigrationStatus struct {
	// +optional
	Phase MigrationPhase `json:"phase,omitempty"`
	// SourceHost is the host the sandbox ran on when the migration began.
	// +optional
	SourceHost string `json:"sourceHost,omitempty"`
	// TargetHost is the host it moves to.
	// +optional
	TargetHost string `json:"targetHost,omitempty"`
	// SandboxUID is the sandbox's UID when the migration began.
	// +optional
	SandboxUID types.UID `json:"sandboxUID,omitempty"`
	// TargetIP is the sandbox's address on the target.
	// +optional
	TargetIP string `json:"targetIP,omitempty"`
	// DowntimeMillis is how long the sandbox was paused for the switch,
	// as the source measured it.
	// +optional
	DowntimeMillis int64 `json:"downtimeMillis,omitempty"`
	// TotalMillis is the whole transfer, from the first byte to the
	// switch.
	// +optional
	TotalMillis int64 `json:"totalMillis,omitempty"`
	// Bytes is what went over the stream; Rounds the passes over dirty
	// memory.
	// +optional
	Bytes int64 `json:"bytes,omitempty"`
	// +optional
	Rounds int `json:"rounds,omitempty"`
	// Bound: the control plane has bound the sandbox to the target (once;
	// a migration is never bound again).
	// +optional
	Bound bool `json:"bound,omitempty"`
	// StartedAt is when the target was chosen; CompletedAt when it ended.
	// +optional
	StartedAt *metav1.Time `json:"startedAt,omitempty"`
	// +optional
	CompletedAt *metav1.Time `json:"completedAt,omitempty"`
	// +optional
	Reason string `json:"reason,omitempty"`
	// +optional
	Message string `json:"message,omitempty"`
}

// Migration moves a running sandbox to another host: its memory, devices
// and writable disk are copied while it runs, and it goes on there after
// a short pause. Deleting a Migration that has not switched cancels it
// (the sandbox runs on where it was); one that has, completes first.
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=mig,categories=hearth
// +kubebuilder:selectablefield:JSONPath=`.status.sourceHost`
// +kubebuilder:selectablefield:JSONPath=`.status.targetHost`
// +kubebuilder:printcolumn:name="Sandbox",type=string,JSONPath=`.spec.sandbox`
// +kubebuilder:printcolumn:name="From",type=string,JSONPath=`.status.sourceHost`
// +kubebuilder:printcolumn:name="To",type=string,JSONPath=`.status.targetHost`
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Downtime",type=integer,JSONPath=`.status.downtimeMillis`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type Migration struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   MigrationSpec   `json:"spec"`
	Status MigrationStatus `json:"status,omitempty"`
}

// MigrationList is a list of Migrations.
// +kubebuilder:object:root=true
type MigrationList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Migration `json:"items"`
}

// MigrationFinalizer holds a Migration under way until it has ended and
// its sandbox is bound where it runs: a delete meanwhile cancels it
// without losing the sandbox.
const MigrationFinalizer = "hearth.dev/migration"

// NodeMigrationPath is where a target's node agent takes the stream of a
// migration (its UID) from the source's node agent.
func NodeMigrationPath(uid string) string { return "/migrations/" + uid + "/stream" }

// NodeMigrationLogPath is where a source's node agent gives the target's
// the log of the migrated sandbox's run there.
func NodeMigrationLogPath(uid string) string { return "/migrations/" + uid + "/log" }

func init() {
	SchemeBuilder.Register(&Migration{}, &MigrationList{})
}
