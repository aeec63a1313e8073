package v1alpha1

// TenantRoles are the ClusterRoles hearth's API server installs for
// tenants, from the least: view reads a namespace's sandboxes and their
// logs; edit also creates, changes and deletes them, execs and attaches,
// and keeps Secrets; admin also grants roles within the namespace.
// `hearth user create --role` binds one of them in a namespace.
var TenantRoles = []string{"view", "edit", "admin"}

// NodeRole is the ClusterRole of node agents (group hearth:nodes).
const NodeRole = "hearth:node"
