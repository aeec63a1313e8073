package v1alpha1

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// SandboxTemplateSpec is a sandbox to boot once per host and save when it
// is ready, so that sandboxes start from its memory instead of booting.
type SandboxTemplateSpec struct {
	// +kubebuilder:validation:MinLength=1
	Image string `json:"image"`
	// ImagePullSecrets as a Sandbox's: Secrets of the template's
	// namespace to pull Image with. Every host builds the template, so
	// every node may read them.
	// +kubebuilder:validation:MaxItems=8
	// +optional
	ImagePullSecrets []corev1.LocalObjectReference `json:"imagePullSecrets,omitempty"`
	// Command and Args as a Sandbox's. The template's process should keep
	// running (a server, a shell waiting on stdin-less input, sleep): the
	// sandboxes started from it run on from it.
	// +optional
	Command []string `json:"command,omitempty"`
	// +optional
	Args []string `json:"args,omitempty"`
	// +listType=map
	// +listMapKey=name
	// +optional
	Env []EnvVar `json:"env,omitempty"`
	// +optional
	WorkingDir string `json:"workingDir,omitempty"`
	// +optional
	User string `json:"user,omitempty"`
	// Resources of the VM, which every sandbox started from it has.
	// +kubebuilder:default={}
	// +optional
	Resources Resources `json:"resources,omitempty"`
	// Readiness says when the template is ready to be saved; without it,
	// as soon as its process has started.
	// +optional
	Readiness *Readiness `json:"readiness,omitempty"`
}

// Readiness is a check run in the template's VM until it succeeds.
// +kubebuilder:validation:XValidation:rule="has(self.exec) != has(self.tcpPort)",message="set exactly one of exec and tcpPort"
type Readiness struct {
	// Exec is a command that must exit 0.
	// +optional
	Exec []string `json:"exec,omitempty"`
	// TCPPort must accept a connection on the guest's 127.0.0.1.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	// +optional
	TCPPort int32 `json:"tcpPort,omitempty"`
	// TimeoutSeconds bounds the wait (120 unless set).
	// +kubebuilder:validation:Minimum=1
	// +optional
	TimeoutSeconds int32 `json:"timeoutSeconds,omitempty"`
}

// TemplateHost is one host's copy of a template.
type TemplateHost struct {
	Name string `json:"name"`
	// Ready: the host holds a snapshot of the template's current spec.
	Ready bool `json:"ready"`
	// Hash identifies the spec the snapshot was made from.
	// +optional
	Hash string `json:"hash,omitempty"`
	// +optional
	SnapshotAt *metav1.Time `json:"snapshotAt,omitempty"`
	// BootMillis is how long the template took from boot to ready.
	// +optional
	BootMillis int64 `json:"bootMillis,omitempty"`
	// Reason and Message say why it is not ready (BootError, NotReady...).
	// +optional
	Reason string `json:"reason,omitempty"`
	// +optional
	Message string `json:"message,omitempty"`
	// Failures counts the attempts in a row that failed; the host waits
	// longer before each next one.
	// +optional
	Failures int32 `json:"failures,omitempty"`
}

// SandboxTemplateStatus records which hosts hold a snapshot.
type SandboxTemplateStatus struct {
	// +listType=map
	// +listMapKey=name
	// +optional
	Hosts []TemplateHost `json:"hosts,omitempty"`
}

// SandboxTemplate is an image and a readiness check, booted once on each
// host that needs it and saved when ready.
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=tpl,categories=hearth
// +kubebuilder:printcolumn:name="Image",type=string,JSONPath=`.spec.image`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type SandboxTemplate struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   SandboxTemplateSpec   `json:"spec"`
	Status SandboxTemplateStatus `json:"status,omitempty"`
}

// SandboxTemplateList is a list of SandboxTemplates.
// +kubebuilder:object:root=true
type SandboxTemplateList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []SandboxTemplate `json:"items"`
}

// WarmPoolSpec is how many sandboxes of a template to keep ready.
type WarmPoolSpec struct {
	// Template names a SandboxTemplate in the namespace.
	// +kubebuilder:validation:MinLength=1
	Template string `json:"template"`
	// Replicas is how many ready, unclaimed sandboxes to keep.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=1000
	Replicas int32 `json:"replicas"`
}

// WarmPoolStatus counts the pool's sandboxes.
type WarmPoolStatus struct {
	// Replicas is how many unclaimed sandboxes the pool has, ready or not.
	// +optional
	Replicas int32 `json:"replicas"`
	// ReadyReplicas of them run and can be claimed at once.
	// +optional
	ReadyReplicas int32 `json:"readyReplicas"`
	// Refilling of them are still starting.
	// +optional
	Refilling int32 `json:"refilling"`
	// Claimed is how many sandboxes run on a VM they took from the pool.
	// +optional
	Claimed int32 `json:"claimed"`
	// Waiting is how many claims wait for a ready sandbox.
	// +optional
	Waiting int32 `json:"waiting"`
	// Selector selects the pool's sandboxes (for the scale subresource).
	// +optional
	Selector string `json:"selector,omitempty"`
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// WarmPool keeps sandboxes of a template restored and ready; a Sandbox
// with spec.source.warmPool takes one at once, and the pool refills.
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:subresource:scale:specpath=.spec.replicas,statuspath=.status.replicas,selectorpath=.status.selector
// +kubebuilder:resource:shortName=wp,categories=hearth
// +kubebuilder:printcolumn:name="Template",type=string,JSONPath=`.spec.template`
// +kubebuilder:printcolumn:name="Desired",type=integer,JSONPath=`.spec.replicas`
// +kubebuilder:printcolumn:name="Ready",type=integer,JSONPath=`.status.readyReplicas`
// +kubebuilder:printcolumn:name="Refilling",type=integer,JSONPath=`.status.refilling`
// +kubebuilder:printcolumn:name="Claimed",type=integer,JSONPath=`.status.claimed`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type WarmPool struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   WarmPoolSpec   `json:"spec"`
	Status WarmPoolStatus `json:"status,omitempty"`
}

// WarmPoolList is a list of WarmPools.
// +kubebuilder:object:root=true
type WarmPoolList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []WarmPool `json:"items"`
}

// Labels and annotations of warm pool sandboxes.
const (
	// LabelWarmPool is on each sandbox the pool made (its members).
	LabelWarmPool = "hearth.dev/warm-pool"
	// AnnotationClaimedBy is set on a member when a claim takes it: the
	// claiming sandbox's UID. The member's VM is the claim's from then on.
	AnnotationClaimedBy = "hearth.dev/claimed-by"
	// WarmPoolReady is the pool's condition: False with the reason when
	// its template cannot be started.
	WarmPoolReady = "Ready"
)

func init() {
	SchemeBuilder.Register(&SandboxTemplate{}, &SandboxTemplateList{}, &WarmPool{}, &WarmPoolList{})
}
