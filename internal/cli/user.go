package cli

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/config"
	"hearth.dev/hearth/internal/pki"
)

// Limits on a user certificate's life: long enough for a working day by
// default, never so long that a lost kubeconfig is a standing key.
const (
	defaultUserTTL = 24 * time.Hour
	maxUserTTL     = 366 * 24 * time.Hour
	minUserTTL     = time.Minute
)

func userCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "user",
		Short: "Give people and programs their own access to one namespace",
	}
	cmd.AddCommand(userCreateCmd(g), userDeleteCmd(g))
	return cmd
}

// userOptions are what user create and delete share. The namespace is
// hearth's --namespace, required here.
type userOptions struct {
	dataDir string
	also    bool
}

func (o *userOptions) flags(cmd *cobra.Command) {
	cmd.Flags().StringVar(&o.dataDir, "data-dir", config.DataDir(), "the control plane's data directory (its CA key and admin kubeconfig)")
}

// grantFlags are create's: what bindUser may do beyond one namespace.
func (o *userOptions) grantFlags(cmd *cobra.Command) {
	o.flags(cmd)
	cmd.Flags().BoolVar(&o.also, "also", false, "give a user already bound in another namespace this one too (one identity, both namespaces)")
}

// admin is a clientset with the control plane's admin credentials:
// --kubeconfig or $KUBECONFIG, else DATA-DIR/kubeconfig.
func (o *userOptions) admin(g *globals) (*kubernetes.Clientset, *clientcmdapi.Config, error) {
	path := g.kubeconfig()
	if path == "" {
		path = filepath.Join(o.dataDir, "kubeconfig")
	}
	raw, err := clientcmd.LoadFromFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("the admin kubeconfig: %w", err)
	}
	cfg, err := clientcmd.NewDefaultClientConfig(*raw, nil).ClientConfig()
	if err != nil {
		return nil, nil, fmt.Errorf("the admin kubeconfig %s: %w", path, err)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	return cs, raw, err
}

// validUserName refuses names that are not plain user names, or that
// could pass for one of hearth's own identities.
func validUserName(name string) error {
	if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
		return fmt.Errorf("user name %q: %s", name, strings.Join(errs, "; "))
	}
	if strings.HasPrefix(name, "system") || strings.HasPrefix(name, "hearth") {
		return fmt.Errorf("user name %q: names beginning with system or hearth are hearth's own identities", name)
	}
	return nil
}

// validateGrant checks what user create and token create grant: a user
// name, a tenant namespace, one of the tenant roles, for a while.
func validateGrant(name, namespace, role string, ttl time.Duration) error {
	if ttl < minUserTTL || ttl > maxUserTTL {
		return fmt.Errorf("--ttl %s: must be from %s to %s", ttl, minUserTTL, maxUserTTL)
	}
	if err := validUserName(name); err != nil {
		return err
	}
	if namespace == "" {
		return errors.New("--namespace is required")
	}
	if errs := validation.IsDNS1123Label(namespace); len(errs) > 0 {
		return fmt.Errorf("--namespace %q: %s", namespace, strings.Join(errs, "; "))
	}
	switch namespace {
	case pki.TokenNamespace, v1alpha1.LeaseNamespace, "default":
		return fmt.Errorf("--namespace %s is hearth's own (tokens, leases, the events of hosts), not a tenant's", namespace)
	}
	if !slices.Contains(v1alpha1.TenantRoles, role) {
		return fmt.Errorf("--role %q: want one of %s", role, strings.Join(v1alpha1.TenantRoles, ", "))
	}
	return nil
}

func bindingName(user string) string { return "hearth-user-" + user }

// userLabel marks the bindings user create and token create make.
const userLabel = "hearth.dev/user"

func userCreateCmd(g *globals) *cobra.Command {
	var o userOptions
	var role, out string
	var ttl time.Duration
	cmd := &cobra.Command{
		Use:   "create NAME --namespace NS --role admin|edit|view [--ttl 24h] [--out FILE]",
		Short: "Bind NAME to a role in a namespace and write a kubeconfig with a short-lived certificate",
		Long: `Run on the control plane (it needs the CA key in --data-dir). Creates the
namespace if it does not exist, binds user NAME there to the ClusterRole
--role (a RoleBinding named hearth-user-NAME), and writes a kubeconfig whose
client certificate names NAME and lasts --ttl.

  view   read sandboxes, snapshots, templates, pools, routes, policies, logs
  edit   view, and create, change and delete them, exec and attach, Secrets
  admin  edit, and grant roles within the namespace

A certificate cannot be recalled: keep --ttl short, and take access away at
once with 'hearth user delete', which removes the binding.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if err := validateGrant(name, g.namespace, role, ttl); err != nil {
				return err
			}
			if out == "" {
				out = name + ".kubeconfig"
			}
			ca, err := pki.LoadCA(filepath.Join(o.dataDir, "pki"), true)
			if err != nil {
				return err
			}
			certPEM, keyPEM, err := ca.IssueClient(name, nil, ttl)
			if err != nil {
				return fmt.Errorf("%w (run this on the control plane, with its --data-dir)", err)
			}
			cs, admin, err := o.admin(g)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if err := bindUser(ctx, cs, g.namespace, name, role, o.also); err != nil {
				return err
			}
			cluster := admin.Clusters[admin.Contexts[admin.CurrentContext].Cluster]
			kc := clientcmdapi.NewConfig()
			kc.Clusters["hearth"] = &clientcmdapi.Cluster{Server: cluster.Server, CertificateAuthorityData: cluster.CertificateAuthorityData}
			kc.AuthInfos[name] = &clientcmdapi.AuthInfo{ClientCertificateData: certPEM, ClientKeyData: keyPEM}
			kc.Contexts["hearth"] = &clientcmdapi.Context{Cluster: "hearth", AuthInfo: name, Namespace: g.namespace}
			kc.CurrentContext = "hearth"
			// WriteToFile writes 0600: the file holds a private key.
			if err := clientcmd.WriteToFile(*kc, out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "user %s is %s in namespace %s until %s; kubeconfig in %s\n",
				name, role, g.namespace, time.Now().Add(ttl).UTC().Format(time.RFC3339), out)
			return nil
		},
	}
	o.grantFlags(cmd)
	cmd.Flags().StringVar(&role, "role", "", "the user's role in the namespace: "+strings.Join(v1alpha1.TenantRoles, ", "))
	cmd.Flags().DurationVar(&ttl, "ttl", defaultUserTTL, fmt.Sprintf("how long the certificate lasts (%s to %s)", minUserTTL, maxUserTTL))
	cmd.Flags().StringVarP(&out, "out", "o", "", "where to write the kubeconfig (default NAME.kubeconfig)")
	return cmd
}

// bindUser makes the namespace if need be and binds user to role there,
// replacing an earlier binding of the user's with another role. A user
// is one identity: one already bound in another namespace is refused
// unless more is set, which gives it this namespace too.
func bindUser(ctx context.Context, cs *kubernetes.Clientset, ns, user, role string, more bool) error {
	mine, err := cs.RbacV1().RoleBindings("").List(ctx, metav1.ListOptions{LabelSelector: userLabel + "=" + user})
	if err != nil {
		return fmt.Errorf("role bindings of %s: %w", user, err)
	}
	for _, b := range mine.Items {
		if b.Namespace != ns && !more {
			return fmt.Errorf("user %s already has access to namespace %s: one name is one identity, whose credentials reach every namespace it is bound in; "+
				"choose another name, or pass --also to give %s namespace %s as well", user, b.Namespace, user, ns)
		}
	}
	_, err = cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	switch {
	case err == nil:
		// A new namespace: one deleted before may have left grants that
		// would now reach its new tenant (nothing here empties a
		// deleted namespace).
		left, err := cs.RbacV1().RoleBindings(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		if len(left.Items) > 0 {
			return fmt.Errorf("namespace %s is new but holds %d role bindings (%s, ...) left from a namespace of that name deleted before: delete them first",
				ns, len(left.Items), left.Items[0].Name)
		}
	case !apierrors.IsAlreadyExists(err):
		return fmt.Errorf("namespace %s: %w", ns, err)
	}
	b := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: bindingName(user), Labels: map[string]string{userLabel: user}},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: user}},
	}
	bindings := cs.RbacV1().RoleBindings(ns)
	old, err := bindings.Get(ctx, b.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return fmt.Errorf("role binding %s/%s: %w", ns, b.Name, err)
	case old.RoleRef == b.RoleRef:
		return nil
	default:
		// A binding's roleRef cannot change: replace it.
		if err := bindings.Delete(ctx, b.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("role binding %s/%s: %w", ns, b.Name, err)
		}
	}
	if _, err := bindings.Create(ctx, b, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("bind %s to %s in %s: %w", user, role, ns, err)
	}
	return nil
}

func userDeleteCmd(g *globals) *cobra.Command {
	var o userOptions
	cmd := &cobra.Command{
		Use:   "delete NAME --namespace NS",
		Short: "Take a user's access to a namespace away, at once",
		Long: `Removes the RoleBinding that 'hearth user create' made. The user's
certificate still proves who it is until it expires, but grants nothing in
the namespace once the API server has seen the deletion (milliseconds).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if g.namespace == "" {
				return errors.New("--namespace is required")
			}
			cs, _, err := o.admin(g)
			if err != nil {
				return err
			}
			err = cs.RbacV1().RoleBindings(g.namespace).Delete(cmd.Context(), bindingName(args[0]), metav1.DeleteOptions{})
			if apierrors.IsNotFound(err) {
				return fmt.Errorf("user %s has no access to namespace %s given by hearth user create", args[0], g.namespace)
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "user %s has no more access to namespace %s\n", args[0], g.namespace)
			return nil
		},
	}
	o.flags(cmd)
	return cmd
}
