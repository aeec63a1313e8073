package v1alpha1

import (
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// RestartPolicy says whether a sandbox's workload is run again when it ends.
// +kubebuilder:validation:Enum=Never;OnFailure;Always
type RestartPolicy string

const (
	RestartNever     RestartPolicy = "Never"
	RestartOnFailure RestartPolicy = "OnFailure"
	RestartAlways    RestartPolicy = "Always"
)

// Phase is where a sandbox is in its life.
type Phase string

const (
	PhasePending   Phase = "Pending"   // accepted, waiting for a host
	PhaseScheduled Phase = "Scheduled" // bound to a host that has not started it yet
	PhaseBooting   Phase = "Booting"   // the host is pulling the image and booting the VM
	PhaseRunning   Phase = "Running"   // the workload runs
	PhaseSucceeded Phase = "Succeeded" // the workload exited 0 and will not run again
	PhaseFailed    Phase = "Failed"    // it exited non-zero, could not start, or timed out, and will not run again
)

// Terminal reports whether a sandbox in phase p is done for good.
func (p Phase) Terminal() bool { return p == PhaseSucceeded || p == PhaseFailed }

// EnvVar is one environment variable of the workload.
type EnvVar struct {
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:Pattern=`^[^=]+$`
	Name string `json:"name"`
	// +optional
	Value string `json:"value,omitempty"`
}

// Resources is what one sandbox's VM gets. The fields are pointers so that
// a client that leaves one out (a Go client included) gets the default.
type Resources struct {
	// CPU is the number of virtual CPUs (rounded up to whole CPUs for the
	// VM; the scheduler counts the quantity as given). Unset, the API
	// server sets it, and Memory and Disk, from the namespace's LimitRange
	// default (type Sandbox), else 1 CPU, 256Mi and 1Gi.
	// +kubebuilder:validation:XValidation:rule="quantity(string(self)).isGreaterThan(quantity('0'))",message="must be positive"
	// +kubebuilder:validation:XValidation:rule="quantity(string(self)).compareTo(quantity('64')) <= 0",message="must be at most 64"
	// +optional
	CPU *resource.Quantity `json:"cpu,omitempty"`
	// Memory is the guest's RAM.
	// +kubebuilder:validation:XValidation:rule="quantity(string(self)).compareTo(quantity('48Mi')) >= 0",message="must be at least 48Mi: a guest needs that much to boot"
	// +kubebuilder:validation:XValidation:rule="quantity(string(self)).compareTo(quantity('256Gi')) <= 0",message="must be at most 256Gi"
	// +optional
	Memory *resource.Quantity `json:"memory,omitempty"`
	// Disk is the size of the writable layer over the image.
	// +kubebuilder:validation:XValidation:rule="quantity(string(self)).compareTo(quantity('8Mi')) >= 0",message="must be at least 8Mi"
	// +kubebuilder:validation:XValidation:rule="quantity(string(self)).compareTo(quantity('4Ti')) <= 0",message="must be at most 4Ti"
	// +optional
	Disk *resource.Quantity `json:"disk,omitempty"`
}

// SandboxSpec is what to run and where.
// +kubebuilder:validation:XValidation:rule="has(self.image) || has(self.source)",message="give an image, or a source to start from"
// +kubebuilder:validation:XValidation:rule="has(self.source) == has(oldSelf.source) && (!has(self.source) || self.source == oldSelf.source)",message="source is immutable"
type SandboxSpec struct {
	// Image is an OCI image reference (a registry reference, oci:DIR[:TAG]
	// or docker-archive:FILE). A sandbox with a source may leave it out:
	// it runs the source's image.
	// +kubebuilder:validation:MinLength=1
	// +optional
	Image string `json:"image,omitempty"`
	// ImagePullSecrets name Secrets of the sandbox's namespace, of type
	// kubernetes.io/dockerconfigjson, with the credentials to pull Image:
	// the node that runs the sandbox may read them, and no other. Without
	// them a node pulls anonymously (never with its own credentials); an
	// image a node holds from a pull with credentials is used for another
	// sandbox only after its registry accepts that sandbox's.
	// +kubebuilder:validation:MaxItems=8
	// +optional
	ImagePullSecrets []corev1.LocalObjectReference `json:"imagePullSecrets,omitempty"`
	// Source starts the sandbox from a snapshot, a template or a warm pool
	// instead of booting the image.
	// +optional
	Source *SandboxSource `json:"source,omitempty"`
	// Command replaces the image's Entrypoint.
	// +optional
	Command []string `json:"command,omitempty"`
	// Args replace the image's Cmd.
	// +optional
	Args []string `json:"args,omitempty"`
	// Env is added to the image's environment, replacing variables of the
	// same name.
	// +listType=map
	// +listMapKey=name
	// +optional
	Env []EnvVar `json:"env,omitempty"`
	// WorkingDir overrides the image's.
	// +optional
	WorkingDir string `json:"workingDir,omitempty"`
	// User overrides the image's: a name or uid[:gid] in the image.
	// +optional
	User string `json:"user,omitempty"`
	// Resources of the VM.
	// +kubebuilder:default={}
	// +optional
	Resources Resources `json:"resources,omitempty"`
	// RestartPolicy says whether the workload runs again when it ends.
	// +kubebuilder:default=Never
	// +optional
	RestartPolicy RestartPolicy `json:"restartPolicy,omitempty"`
	// TimeoutSeconds bounds the sandbox's whole life from its first start:
	// when it passes, the VM is stopped and the sandbox ends Failed.
	// +kubebuilder:validation:Minimum=1
	// +optional
	TimeoutSeconds *int64 `json:"timeoutSeconds,omitempty"`
	// HostSelector restricts the sandbox to hosts with these labels.
	// +optional
	HostSelector map[string]string `json:"hostSelector,omitempty"`
	// Tolerations let the sandbox onto hosts with matching taints.
	// +optional
	Tolerations []corev1.Toleration `json:"tolerations,omitempty"`
	// Affinity attracts the sandbox to, or repels it from, hosts or zones
	// that run other sandboxes of this namespace.
	// +optional
	Affinity *Affinity `json:"affinity,omitempty"`
	// Placement overrides the scheduler's policy for this sandbox: Spread
	// (the emptiest host) or Binpack (the fullest that fits).
	// +kubebuilder:validation:Enum=Spread;Binpack
	// +optional
	Placement Placement `json:"placement,omitempty"`
	// Isolation is the boundary the sandbox needs around it: hardware
	// runs it only on hosts whose guests run under hardware
	// virtualization (KVM), never on a development host that emulates
	// them in software (TCG). Empty takes any host.
	// +kubebuilder:validation:Enum=hardware
	// +optional
	Isolation Isolation `json:"isolation,omitempty"`
	// Stdin keeps the workload's stdin open for `hearth attach`.
	// +optional
	Stdin bool `json:"stdin,omitempty"`
	// StdinOnce closes the workload's stdin when the first attached
	// client's input ends (`hearth run -i` through the API).
	// +optional
	StdinOnce bool `json:"stdinOnce,omitempty"`
	// TTY gives the workload a terminal.
	// +optional
	TTY bool `json:"tty,omitempty"`
	// Ports are what the sandbox serves: the ingress and policies name
	// them.
	// +listType=map
	// +listMapKey=port
	// +listMapKey=protocol
	// +optional
	Ports []SandboxPort `json:"ports,omitempty"`
	// Network is how the sandbox reaches beyond the cluster.
	// +kubebuilder:default={}
	// +optional
	Network SandboxNetwork `json:"network,omitempty"`
}

// SandboxSource is what a sandbox starts from; exactly one is set. From a
// memory snapshot, a template or a warm pool the sandbox runs on from a
// saved, running VM: its command and args, if given, run in it as the
// workload (the saved process runs on beside it); without them the saved
// workload is the sandbox's. From a disk-only snapshot it boots its image
// (the snapshot's unless given) with the saved writable layer.
// +kubebuilder:validation:XValidation:rule="(has(self.snapshot) ? 1 : 0) + (has(self.template) ? 1 : 0) + (has(self.warmPool) ? 1 : 0) == 1",message="set exactly one of snapshot, template and warmPool"
type SandboxSource struct {
	// Snapshot names a Snapshot in the namespace. The sandbox runs on the
	// host that holds it.
	// +optional
	Snapshot string `json:"snapshot,omitempty"`
	// Template names a SandboxTemplate in the namespace: the sandbox is a
	// fork of its snapshot on the host it is placed on (made there first
	// if the host has none).
	// +optional
	Template string `json:"template,omitempty"`
	// WarmPool names a WarmPool in the namespace: the sandbox takes one of
	// its ready sandboxes (a claim), or waits for one.
	// +optional
	WarmPool string `json:"warmPool,omitempty"`
}

// Placement is how the scheduler chooses among hosts that fit.
type Placement string

const (
	PlacementSpread  Placement = "Spread"
	PlacementBinpack Placement = "Binpack"
)

// Isolation is the boundary a sandbox needs.
type Isolation string

// IsolationHardware places a sandbox only on KVM hosts.
const IsolationHardware Isolation = "hardware"

// Affinity are rules over the other sandboxes of the namespace.
type Affinity struct {
	// SandboxAffinity: place the sandbox in a topology domain (a host, a
	// zone) that runs sandboxes matching each term.
	// +optional
	SandboxAffinity []AffinityTerm `json:"sandboxAffinity,omitempty"`
	// SandboxAntiAffinity: place it in a domain that runs none of them.
	// +optional
	SandboxAntiAffinity []AffinityTerm `json:"sandboxAntiAffinity,omitempty"`
}

// AffinityTerm selects sandboxes and names the host label whose values
// are the topology domains.
type AffinityTerm struct {
	// LabelSelector picks the sandboxes of the rule (in this namespace).
	LabelSelector *metav1.LabelSelector `json:"labelSelector"`
	// TopologyKey is a host label: hearth.dev/hostname (one domain per
	// host, the default) or topology.hearth.dev/zone, or any other.
	// +kubebuilder:default="hearth.dev/hostname"
	// +optional
	TopologyKey string `json:"topologyKey,omitempty"`
	// Weight makes the rule a preference (1-100, added to the score of
	// the hosts that satisfy it). Without it the rule is required.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=100
	// +optional
	Weight int32 `json:"weight,omitempty"`
}

// SandboxStatus is what hearth observed.
// +kubebuilder:validation:XValidation:rule="!has(oldSelf.hostName) || size(oldSelf.hostName) == 0 || !has(self.hostName) || size(self.hostName) == 0 || self.hostName == oldSelf.hostName || (has(self.migration) && size(self.migration) > 0 && (!has(oldSelf.migration) || self.migration != oldSelf.migration))",message="hostName is set when the sandbox is bound and may be cleared (to place it again), never changed to another host but by a migration (status.migration names its UID)"
type SandboxStatus struct {
	// +optional
	Phase Phase `json:"phase,omitempty"`
	// HostName is the Host the sandbox is bound to; only binding sets it.
	// It is cleared when the sandbox is placed again (its host was lost,
	// or drained), and changed only by a migration (Migration).
	// +optional
	HostName string `json:"hostName,omitempty"`
	// Migration is the UID of the last Migration that moved the sandbox
	// to another host; a change of HostName names a new one.
	// +optional
	Migration types.UID `json:"migration,omitempty"`
	// IP is the sandbox's address, leased from its host's sandbox CIDR
	// before the VM starts; it is the sandbox's until it is deleted.
	// +optional
	IP string `json:"ip,omitempty"`
	// StartedAt is when the workload last started.
	// +optional
	StartedAt *metav1.Time `json:"startedAt,omitempty"`
	// +optional
	FinishedAt *metav1.Time `json:"finishedAt,omitempty"`
	// BootMillis is the time from starting the VM to the workload running.
	// +optional
	BootMillis int64 `json:"bootMillis,omitempty"`
	// +optional
	ExitCode *int32 `json:"exitCode,omitempty"`
	// Reason is a CamelCase word for why the sandbox is in its phase
	// (Unschedulable, ImagePullError, BootError, DeadlineExceeded, BackOff,
	// OOMKilled, Error, Completed, HostLost, Evicted).
	// +optional
	Reason string `json:"reason,omitempty"`
	// +optional
	Message string `json:"message,omitempty"`
	// RestartCount is how many times the workload was started again.
	// +optional
	RestartCount int32 `json:"restartCount,omitempty"`
	// WarmPoolMember is the warm pool's sandbox whose VM this sandbox
	// took over (spec.source.warmPool); set with the binding.
	// +optional
	WarmPoolMember string `json:"warmPoolMember,omitempty"`
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// Sandbox is one workload in one micro-VM.
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=sb;sbx,categories=hearth
// +kubebuilder:selectablefield:JSONPath=`.status.hostName`
// +kubebuilder:selectablefield:JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Exit",type=integer,JSONPath=`.status.exitCode`
// +kubebuilder:printcolumn:name="Host",type=string,JSONPath=`.status.hostName`
// +kubebuilder:printcolumn:name="IP",type=string,JSONPath=`.status.ip`
// +kubebuilder:printcolumn:name="Image",type=string,JSONPath=`.spec.image`
// +kubebuilder:printcolumn:name="Restarts",type=integer,JSONPath=`.status.restartCount`,priority=1
// +kubebuilder:printcolumn:name="Reason",type=string,JSONPath=`.status.reason`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type Sandbox struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   SandboxSpec   `json:"spec"`
	Status SandboxStatus `json:"status,omitempty"`
}

// SandboxList is a list of Sandboxes.
// +kubebuilder:object:root=true
type SandboxList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Sandbox `json:"items"`
}

// Finalizer is on every Sandbox: the host removes it once the VM and
// everything it had on the host are gone.
const Finalizer = "hearth.dev/vm"

// Condition types of a Sandbox.
const (
	ConditionScheduled = "Scheduled"
	ConditionReady     = "Ready"
	// ConditionEvicting asks the sandbox's host to stop it and give it
	// back to the scheduler (hearth host drain).
	ConditionEvicting = "Evicting"
)

// Unbind gives the sandbox back to the scheduler: it is to be placed
// again, on another host, and run from the start there.
func (s *SandboxStatus) Unbind(reason, message string) {
	s.HostName, s.Phase, s.Reason, s.Message, s.IP = "", PhasePending, reason, message, ""
	s.ExitCode, s.FinishedAt, s.StartedAt, s.BootMillis = nil, nil, nil, 0
	s.RestartCount++
	now := metav1.Now()
	meta.RemoveStatusCondition(&s.Conditions, ConditionEvicting)
	meta.SetStatusCondition(&s.Conditions, metav1.Condition{Type: ConditionScheduled, Status: metav1.ConditionFalse,
		Reason: reason, Message: message, LastTransitionTime: now})
	meta.SetStatusCondition(&s.Conditions, metav1.Condition{Type: ConditionReady, Status: metav1.ConditionFalse,
		Reason: reason, Message: message, LastTransitionTime: now})
}

func init() {
	SchemeBuilder.Register(&Sandbox{}, &SandboxList{})
}

// ClaimsWarmPool reports whether the sandbox is to take over a running
// sandbox of a warm pool. One with a command of its own does not: the
// pool's VMs run the template's process, so it starts as a fork of the
// pool's template instead.
func (s *Sandbox) ClaimsWarmPool() bool {
	src := s.Spec.Source
	return src != nil && src.WarmPool != "" && len(s.Spec.Command) == 0 && len(s.Spec.Args) == 0
}

// Default values of Resources where no LimitRange gives one (the API
// server's limit admission sets them).
var (
	DefaultCPU    = resource.MustParse("1")
	DefaultMemory = resource.MustParse("256Mi")
	DefaultDisk   = resource.MustParse("1Gi")
)

// Requests are the resources with defaults filled in.
func (r Resources) Requests() (cpu, memory, disk resource.Quantity) {
	get := func(q *resource.Quantity, d resource.Quantity) resource.Quantity {
		if q == nil {
			return d.DeepCopy()
		}
		return q.DeepCopy()
	}
	return get(r.CPU, DefaultCPU), get(r.Memory, DefaultMemory), get(r.Disk, DefaultDisk)
}
