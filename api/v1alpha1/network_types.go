package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// SandboxPort is a port the sandbox serves.
type SandboxPort struct {
	// Name lets Routes and NetworkPolicies refer to the port.
	// +kubebuilder:validation:MaxLength=15
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	// +optional
	Name string `json:"name,omitempty"`
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	Port int32 `json:"port"`
	// +kubebuilder:validation:Enum=TCP;UDP
	// +kubebuilder:default=TCP
	// +optional
	Protocol Protocol `json:"protocol,omitempty"`
	// Public serves the port on the ingress under the generated host
	// names PORT-SANDBOX-NAMESPACE.DOMAIN and NAME-SANDBOX-NAMESPACE.DOMAIN,
	// to anyone who reaches the ingress: no access token, no network
	// policy. A port that is not public is reached from outside only
	// through a Route (which may require a token).
	// +optional
	Public bool `json:"public,omitempty"`
}

// SandboxNetwork is how the sandbox reaches beyond the cluster.
type SandboxNetwork struct {
	// NAT lets the sandbox reach addresses outside the cluster's sandbox
	// network through its host's address (masquerade). Off, such packets
	// are dropped at the sandbox's tap.
	// +kubebuilder:default=true
	// +optional
	NAT *bool `json:"nat,omitempty"`
}

// NATEnabled reports whether the sandbox may reach the outside.
func (n SandboxNetwork) NATEnabled() bool { return n.NAT == nil || *n.NAT }

// Protocol is an IP protocol of a policy rule or a port.
// +kubebuilder:validation:Enum=TCP;UDP;ICMP
type Protocol string

const (
	ProtocolTCP  Protocol = "TCP"
	ProtocolUDP  Protocol = "UDP"
	ProtocolICMP Protocol = "ICMP"
)

// PolicyType is a direction a NetworkPolicy isolates.
// +kubebuilder:validation:Enum=Ingress;Egress
type PolicyType string

const (
	PolicyIngress PolicyType = "Ingress"
	PolicyEgress  PolicyType = "Egress"
)

// NetworkPolicySpec has the semantics of Kubernetes' NetworkPolicy, with
// sandboxes in the place of pods: a sandbox selected by any policy of a
// direction accepts, in that direction, only what some rule of those
// policies allows (replies to allowed connections included).
type NetworkPolicySpec struct {
	// SandboxSelector picks the sandboxes of this namespace the policy
	// applies to; empty picks all of them.
	SandboxSelector metav1.LabelSelector `json:"sandboxSelector"`
	// PolicyTypes are the directions the policy isolates. Without them:
	// Ingress, plus Egress if the policy has egress rules.
	// +optional
	PolicyTypes []PolicyType `json:"policyTypes,omitempty"`
	// +kubebuilder:validation:MaxItems=256
	// +optional
	Ingress []NetworkPolicyIngressRule `json:"ingress,omitempty"`
	// +kubebuilder:validation:MaxItems=256
	// +optional
	Egress []NetworkPolicyEgressRule `json:"egress,omitempty"`
}

// NetworkPolicyIngressRule allows traffic from any of From (everywhere if
// empty) to any of Ports (every port if empty).
type NetworkPolicyIngressRule struct {
	// +kubebuilder:validation:MaxItems=256
	// +optional
	From []NetworkPolicyPeer `json:"from,omitempty"`
	// +kubebuilder:validation:MaxItems=64
	// +optional
	Ports []NetworkPolicyPort `json:"ports,omitempty"`
}

// NetworkPolicyEgressRule allows traffic to any of To (everywhere if
// empty) on any of Ports (every port if empty).
type NetworkPolicyEgressRule struct {
	// +kubebuilder:validation:MaxItems=256
	// +optional
	To []NetworkPolicyPeer `json:"to,omitempty"`
	// +kubebuilder:validation:MaxItems=64
	// +optional
	Ports []NetworkPolicyPort `json:"ports,omitempty"`
}

// NetworkPolicyPeer is a set of sandboxes or addresses. SandboxSelector
// alone picks sandboxes of the policy's namespace; NamespaceSelector alone
// all sandboxes of the namespaces it picks; both, the sandboxes it picks
// in those namespaces. IPBlock is exclusive with the other two.
// +kubebuilder:validation:XValidation:rule="has(self.ipBlock) != (has(self.sandboxSelector) || has(self.namespaceSelector))",message="set ipBlock, or sandboxSelector and/or namespaceSelector"
type NetworkPolicyPeer struct {
	// +optional
	SandboxSelector *metav1.LabelSelector `json:"sandboxSelector,omitempty"`
	// +optional
	NamespaceSelector *metav1.LabelSelector `json:"namespaceSelector,omitempty"`
	// +optional
	IPBlock *IPBlock `json:"ipBlock,omitempty"`
}

// IPBlock is a CIDR minus some of its parts.
type IPBlock struct {
	// +kubebuilder:validation:MaxLength=18
	// +kubebuilder:validation:XValidation:rule="isCIDR(self) && cidr(self).ip().family() == 4",message="must be an IPv4 CIDR"
	CIDR string `json:"cidr"`
	// Except are CIDRs inside CIDR (others are ignored).
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:Pattern=`^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$`
	// +optional
	Except []string `json:"except,omitempty"`
}

// NetworkPolicyPort is a protocol and a port or range of ports. ICMP has
// no ports.
// +kubebuilder:validation:XValidation:rule="!has(self.endPort) || (has(self.port) && type(self.port) == int)",message="endPort needs a numeric port"
type NetworkPolicyPort struct {
	// +kubebuilder:default=TCP
	// +optional
	Protocol *Protocol `json:"protocol,omitempty"`
	// Port is a number or the name of a port in the destination
	// sandbox's spec.ports; every port if not given.
	// +optional
	Port *intstr.IntOrString `json:"port,omitempty"`
	// EndPort makes Port the first of a range that ends here.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	// +optional
	EndPort *int32 `json:"endPort,omitempty"`
}

// NetworkPolicy says which traffic its sandboxes accept and send; it is
// enforced by eBPF programs on each sandbox's tap device.
// +kubebuilder:object:root=true
// +kubebuilder:resource:shortName=netpol,categories=hearth
// +kubebuilder:printcolumn:name="Sandbox-Selector",type=string,JSONPath=`.spec.sandboxSelector`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type NetworkPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec NetworkPolicySpec `json:"spec"`
}

// NetworkPolicyList is a list of NetworkPolicies.
// +kubebuilder:object:root=true
type NetworkPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []NetworkPolicy `json:"items"`
}

// RouteSpec sends the ingress's requests for a host name and path prefix
// to a port of a sandbox in the Route's namespace.
type RouteSpec struct {
	// Host is the request's host name (without a port). It belongs to
	// the namespace whose Route claimed it first: another namespace's
	// Route for it is refused (and, if two are made at once, the ingress
	// serves the older's).
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:Pattern=`^[a-z0-9*]([-a-z0-9.]*[a-z0-9])?$`
	Host string `json:"host"`
	// PathPrefix matches whole path segments; "/" (the default) matches all.
	// +kubebuilder:default="/"
	// +kubebuilder:validation:Pattern=`^/`
	// +optional
	PathPrefix string `json:"pathPrefix,omitempty"`
	// Sandbox names the Sandbox that serves the route.
	// +kubebuilder:validation:MinLength=1
	Sandbox string `json:"sandbox"`
	// Port is the sandbox's port: a number, or a name in its spec.ports.
	Port intstr.IntOrString `json:"port"`
	// TLSSecret names a kubernetes.io/tls Secret of the namespace whose
	// certificate the ingress presents for Host (SNI).
	// +optional
	TLSSecret string `json:"tlsSecret,omitempty"`
	// AccessTokenSecret names a Secret of the namespace whose "token" key
	// a request must carry (Authorization: Bearer TOKEN, or the
	// X-Hearth-Token header); others get 401.
	// +optional
	AccessTokenSecret string `json:"accessTokenSecret,omitempty"`
	// TimeoutSeconds bounds the wait for the sandbox's response headers;
	// past it the ingress answers 504.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:default=30
	// +optional
	TimeoutSeconds int32 `json:"timeoutSeconds,omitempty"`
}

// AnnotationRouteHosts, on a Namespace (the admin's to set), lists the
// host names its Routes may take, comma-separated: "app.example.com" that
// name, ".example.com" any name under it. Without it any name not another
// namespace's.
const AnnotationRouteHosts = "hearth.dev/route-hosts"

// Route is a host name and path prefix served by a sandbox through the
// ingress.
// +kubebuilder:object:root=true
// +kubebuilder:resource:categories=hearth
// +kubebuilder:printcolumn:name="Host",type=string,JSONPath=`.spec.host`
// +kubebuilder:printcolumn:name="Path",type=string,JSONPath=`.spec.pathPrefix`
// +kubebuilder:printcolumn:name="Sandbox",type=string,JSONPath=`.spec.sandbox`
// +kubebuilder:printcolumn:name="Port",type=string,JSONPath=`.spec.port`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
// +kubebuilder:selectablefield:JSONPath=`.spec.host`
type Route struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec RouteSpec `json:"spec"`
}

// RouteList is a list of Routes.
// +kubebuilder:object:root=true
type RouteList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Route `json:"items"`
}

func init() {
	SchemeBuilder.Register(&NetworkPolicy{}, &NetworkPolicyList{}, &Route{}, &RouteList{})
}
