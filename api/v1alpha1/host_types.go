package v1alpha1

import (
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// HostSpec is what an operator sets on a host.
type HostSpec struct {
	// Unschedulable keeps new sandboxes off the host (cordon).
	// +optional
	Unschedulable bool `json:"unschedulable,omitempty"`
	// Taints repel sandboxes that do not tolerate them. NoSchedule and
	// NoExecute keep new sandboxes off; PreferNoSchedule only scores the
	// host lower.
	// +optional
	Taints []corev1.Taint `json:"taints,omitempty"`
	// Overcommit multiplies allocatable resources for placement, per
	// resource (cpu: "4" lets the host take four times its CPUs in
	// requests). Missing resources are not overcommitted.
	// +optional
	Overcommit map[corev1.ResourceName]resource.Quantity `json:"overcommit,omitempty"`
	// SandboxCIDR is the range the host's sandboxes get addresses from;
	// the control plane assigns it from the cluster's range once. Its
	// first address is the sandboxes' gateway and DNS server.
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="sandboxCIDR is immutable"
	// +optional
	SandboxCIDR string `json:"sandboxCIDR,omitempty"`
}

// The values of HostStatus.Accel.
const (
	AccelKVM = "kvm"
	AccelTCG = "tcg"
)

// HostStatus is what the node agent reports.
type HostStatus struct {
	// Capacity is the machine's: cpu, memory, disk, sandboxes.
	// +optional
	Capacity corev1.ResourceList `json:"capacity,omitempty"`
	// Allocatable is what sandboxes may use of it.
	// +optional
	Allocatable corev1.ResourceList `json:"allocatable,omitempty"`
	// Accel is how this host runs guests: kvm, or tcg (no isolation
	// boundary: software emulation, on development hosts only).
	// +optional
	Accel string `json:"accel,omitempty"`
	// Address is where the node agent serves sandbox streams (host:port).
	// +optional
	Address string `json:"address,omitempty"`
	// Version of the node agent.
	// +optional
	Version string `json:"version,omitempty"`
	// Images are the image references this host holds converted, so that
	// the scheduler can prefer it for sandboxes of those images.
	// +optional
	Images []string `json:"images,omitempty"`
	// Snapshots are the Snapshots (namespace/name) in this host's
	// snapshot store: a sandbox started from one runs here.
	// +optional
	Snapshots []string `json:"snapshots,omitempty"`
	// Templates are the SandboxTemplates (namespace/name) this host holds
	// a ready snapshot of.
	// +optional
	Templates []string `json:"templates,omitempty"`
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// Host is a machine that runs sandboxes: one node agent.
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,categories=hearth
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Cordoned",type=boolean,JSONPath=`.spec.unschedulable`
// +kubebuilder:printcolumn:name="Accel",type=string,JSONPath=`.status.accel`
// +kubebuilder:printcolumn:name="CPU",type=string,JSONPath=`.status.allocatable.cpu`
// +kubebuilder:printcolumn:name="Memory",type=string,JSONPath=`.status.allocatable.memory`
// +kubebuilder:printcolumn:name="Address",type=string,JSONPath=`.status.address`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type Host struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   HostSpec   `json:"spec,omitempty"`
	Status HostStatus `json:"status,omitempty"`
}

// HostList is a list of Hosts.
// +kubebuilder:object:root=true
type HostList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Host `json:"items"`
}

// ResourceSandboxes is the Host capacity of how many sandboxes it runs at once.
const ResourceSandboxes corev1.ResourceName = "sandboxes"

// HostConditionReady is true while the host's lease is renewed.
const HostConditionReady = "Ready"

// Well-known host labels, for hostSelector and affinity topology keys.
const (
	// LabelHostname is set by every node agent to its host's name.
	LabelHostname = "hearth.dev/hostname"
	// LabelZone is the host's failure domain (hearthd --zone).
	LabelZone = "topology.hearth.dev/zone"
)

// TaintUnreachable is put on a host whose heartbeat has lapsed
// (NoSchedule), as Kubernetes taints an unreachable node.
const TaintUnreachable = "hearth.dev/unreachable"

// LeaseNamespace holds the hosts' heartbeat Leases (one per host, named
// after it), as kube-node-lease does for kubelets.
const LeaseNamespace = "hearth-host-lease"

func init() {
	SchemeBuilder.Register(&Host{}, &HostList{})
}
