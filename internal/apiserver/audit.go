package apiserver

import (
	"fmt"
	"time"

	auditinternal "k8s.io/apiserver/pkg/apis/audit"
	auditv1 "k8s.io/apiserver/pkg/apis/audit/v1"
	"k8s.io/apiserver/pkg/audit/policy"
	"k8s.io/apiserver/pkg/authentication/user"
	genericapiserver "k8s.io/apiserver/pkg/server"
	auditbuffered "k8s.io/apiserver/plugin/pkg/audit/buffered"
	auditlog "k8s.io/apiserver/plugin/pkg/audit/log"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/logfile"
	"hearth.dev/hearth/internal/pki"
)

// The audit log: Kubernetes' audit machinery (k8s.io/apiserver/pkg/audit)
// writing audit.k8s.io/v1 events as JSON lines to a file, rotated at
// auditMaxBytes (one older file kept), with auditPolicy: who exec'd into,
// attached to or read the log of what, who created, changed or deleted
// what, and who wrote a role; not the reads, nor the system's own
// traffic (the controllers through the loopback, the node agents'
// heartbeats and status writes).

const auditMaxBytes = 100 << 20

// auditPolicy is what is recorded, and at what level: bodies only for
// role writes (what was granted), never for Secrets.
var auditPolicy = &auditinternal.Policy{
	OmitStages: []auditinternal.Stage{auditinternal.StageRequestReceived},
	Rules: []auditinternal.PolicyRule{
		{Level: auditinternal.LevelNone, Users: []string{user.APIServerUser}},
		// Secrets (tokens' hashes among them): every access, reads too,
		// never a body.
		{Level: auditinternal.LevelMetadata, Resources: []auditinternal.GroupResources{{Resources: []string{"secrets"}}}},
		{Level: auditinternal.LevelMetadata, Resources: []auditinternal.GroupResources{{Group: v1alpha1.GroupVersion.Group,
			Resources: []string{"sandboxes/exec", "sandboxes/attach", "sandboxes/log"}}}},
		{Level: auditinternal.LevelNone, Verbs: []string{"get", "list", "watch"}},
		// Node agents' heartbeats and their own status: many, and what
		// the objects say anyway.
		{Level: auditinternal.LevelNone, UserGroups: []string{pki.GroupNodes}, Verbs: []string{"update", "patch", "create"},
			Resources: []auditinternal.GroupResources{
				{Group: v1alpha1.GroupVersion.Group, Resources: []string{"hosts/status"}},
				{Group: "coordination.k8s.io", Resources: []string{"leases"}}, {Resources: []string{"events"}}}},
		{Level: auditinternal.LevelNone, Resources: []auditinternal.GroupResources{{Resources: []string{"events"}}}},
		{Level: auditinternal.LevelRequest, Resources: []auditinternal.GroupResources{{Group: "rbac.authorization.k8s.io"}}},
		{Level: auditinternal.LevelMetadata},
	},
}

// applyAudit has gc record its requests into path ("" records nothing).
func applyAudit(gc *genericapiserver.Config, path string) error {
	if path == "" {
		return nil
	}
	w, err := logfile.Open(path, auditMaxBytes)
	if err != nil {
		return fmt.Errorf("audit log: %w", err)
	}
	// Buffered: a request does not wait on the file.
	gc.AuditBackend = auditbuffered.NewBackend(auditlog.NewBackend(w, auditlog.FormatJson, auditv1.SchemeGroupVersion),
		auditbuffered.BatchConfig{BufferSize: 10000, MaxBatchSize: 400, MaxBatchWait: 100 * time.Millisecond})
	gc.AuditPolicyRuleEvaluator = policy.NewPolicyRuleEvaluator(auditPolicy)
	return nil
}
