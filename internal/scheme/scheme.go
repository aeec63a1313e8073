// Package scheme is the runtime.Scheme of hearth's API clients: Kubernetes'
// built-in types and hearth.dev/v1alpha1. It is a package of its own so
// that the CLI can have it without linking the daemon.
package scheme

import (
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"

	"hearth.dev/hearth/api/v1alpha1"
)

// Scheme has hearth's types and Kubernetes' built-in ones.
var Scheme = runtime.NewScheme()

func init() {
	utilruntime.Must(clientgoscheme.AddToScheme(Scheme))
	utilruntime.Must(v1alpha1.AddToScheme(Scheme))
}
