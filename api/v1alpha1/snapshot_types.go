package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// SnapshotSpec says what to save.
type SnapshotSpec struct {
	// Sandbox is the running Sandbox (in this namespace) to save.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="sandbox is immutable"
	Sandbox string `json:"sandbox"`
	// DiskOnly saves the writable layer alone: a sandbox started from the
	// snapshot boots afresh with those files. Otherwise memory, devices
	// and disk are saved, and sandboxes started from it run on from where
	// it was (forks).
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="diskOnly is immutable"
	// +optional
	DiskOnly bool `json:"diskOnly,omitempty"`
}

// SnapshotPhase is where a snapshot is.
type SnapshotPhase string

const (
	SnapshotPending SnapshotPhase = "Pending" // not taken yet
	SnapshotReady   SnapshotPhase = "Ready"   // in its host's store
	SnapshotFailed  SnapshotPhase = "Failed"  // could not be taken
)

// SnapshotStatus is what the host that took it reports.
type SnapshotStatus struct {
	// +optional
	Phase SnapshotPhase `json:"phase,omitempty"`
	// HostName is the host whose snapshot store holds it.
	// +optional
	HostName string `json:"hostName,omitempty"`
	// Image is the saved sandbox's image.
	// +optional
	Image string `json:"image,omitempty"`
	// SizeBytes is the space it takes in the store (allocated blocks).
	// +optional
	SizeBytes int64 `json:"sizeBytes,omitempty"`
	// TakenAt is when it was saved.
	// +optional
	TakenAt *metav1.Time `json:"takenAt,omitempty"`
	// Millis is how long the sandbox was paused or frozen for it.
	// +optional
	Millis int64 `json:"millis,omitempty"`
	// +optional
	Reason string `json:"reason,omitempty"`
	// +optional
	Message string `json:"message,omitempty"`
}

// Snapshot is a saved sandbox: its memory, devices and writable disk, or
// its disk alone. Deleting it frees its space on the host.
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=snap,categories=hearth
// +kubebuilder:selectablefield:JSONPath=`.status.hostName`
// +kubebuilder:printcolumn:name="Sandbox",type=string,JSONPath=`.spec.sandbox`
// +kubebuilder:printcolumn:name="DiskOnly",type=boolean,JSONPath=`.spec.diskOnly`
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Host",type=string,JSONPath=`.status.hostName`
// +kubebuilder:printcolumn:name="Size",type=integer,JSONPath=`.status.sizeBytes`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type Snapshot struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   SnapshotSpec   `json:"spec"`
	Status SnapshotStatus `json:"status,omitempty"`
}

// SnapshotList is a list of Snapshots.
// +kubebuilder:object:root=true
type SnapshotList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Snapshot `json:"items"`
}

// SnapshotFinalizer is on a taken Snapshot: its host removes it once the
// files are gone.
const SnapshotFinalizer = "hearth.dev/snapshot"

func init() {
	SchemeBuilder.Register(&Snapshot{}, &SnapshotList{})
}
