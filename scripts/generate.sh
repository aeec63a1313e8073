#!/bin/sh
# Regenerates what is generated from Go types (`make generate`):
#   api/v1alpha1/zz_generated.deepcopy.go and api/v1alpha1/crds/*.yaml (controller-gen)
#   internal/apiserver/coreopenapi (openapi-gen: the OpenAPI models of the
#   k8s.io/api types the core API serves -- core, coordination, rbac and
#   authorization -- which server-side apply needs)
# The generators run from a scratch module so that they stay out of go.mod.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
CONTROLLER_TOOLS=v0.23.0
KUBE_OPENAPI=$(cd "$root" && go list -m -f '{{.Version}}' k8s.io/kube-openapi)
K8S=$(cd "$root" && go list -m -f '{{.Version}}' k8s.io/api)

cd "$root"
go run sigs.k8s.io/controller-tools/cmd/controller-gen@$CONTROLLER_TOOLS \
	object crd:crdVersions=v1 paths=./api/... output:crd:artifacts:config=api/v1alpha1/crds

gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
cd "$gen"
cat > go.mod <<EOM
module gen
go 1.26
EOM
cat > tools.go <<EOM
package gen

import (
	_ "k8s.io/api/authorization/v1"
	_ "k8s.io/api/coordination/v1"
	_ "k8s.io/api/core/v1"
	_ "k8s.io/api/rbac/v1"
	_ "k8s.io/kube-openapi/cmd/openapi-gen/args"
	_ "k8s.io/kube-openapi/pkg/generators"
)
EOM
go get k8s.io/kube-openapi@"$KUBE_OPENAPI" k8s.io/api@"$K8S" k8s.io/apimachinery@"$K8S" >/dev/null
go mod tidy >/dev/null
go run k8s.io/kube-openapi/cmd/openapi-gen --go-header-file /dev/null \
	--output-file zz_generated.openapi.go \
	--output-dir "$root/internal/apiserver/coreopenapi" \
	--output-pkg hearth.dev/hearth/internal/apiserver/coreopenapi \
	k8s.io/api/core/v1 k8s.io/api/coordination/v1 k8s.io/api/rbac/v1 k8s.io/api/authorization/v1 \
	k8s.io/apimachinery/pkg/apis/meta/v1 \
	k8s.io/apimachinery/pkg/runtime k8s.io/apimachinery/pkg/version \
	k8s.io/apimachinery/pkg/api/resource k8s.io/apimachinery/pkg/util/intstr 2>&1 | grep -v '^API rule violation' || true
