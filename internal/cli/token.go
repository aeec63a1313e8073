package cli

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"hearth.dev/hearth/api/v1alpha1"
	"hearth.dev/hearth/internal/pki"
)

const (
	defaultTokenTTL = 30 * 24 * time.Hour
	tokenUserLabel  = "hearth.dev/token-user"
)

func tokenCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "token",
		Short: "Bearer tokens for programs: create, list, revoke",
	}
	cmd.AddCommand(tokenCreateCmd(g), tokenListCmd(g), tokenDeleteCmd(g))
	return cmd
}

func tokenCreateCmd(g *globals) *cobra.Command {
	var o userOptions
	var role string
	var ttl time.Duration
	cmd := &cobra.Command{
		Use:   "create NAME --namespace NS --role admin|edit|view [--ttl 720h]",
		Short: "Bind user NAME to a role in a namespace and print a bearer token for it",
		Long: `Run with the admin's kubeconfig. Binds user NAME to --role in the namespace
as 'hearth user create' does, and prints a bearer token that authenticates as
NAME until --ttl has passed or it is revoked ('hearth token delete'), which
takes effect at the token's next request. The API server keeps only the
token's SHA-256, in a Secret in namespace hearth-system; the token is shown
once. Programs send it as 'Authorization: Bearer TOKEN' (a kubeconfig's
token field, kubectl --token).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if err := validateGrant(name, g.namespace, role, ttl); err != nil {
				return err
			}
			cs, _, err := o.admin(g)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			token, id, hash, err := pki.NewToken()
			if err != nil {
				return err
			}
			if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: pki.TokenNamespace}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
				return fmt.Errorf("namespace %s: %w", pki.TokenNamespace, err)
			}
			expires := time.Now().Add(ttl).UTC().Format(time.RFC3339)
			sec := &corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{Namespace: pki.TokenNamespace, Name: pki.TokenSecretName(id),
					Labels: map[string]string{tokenUserLabel: name}},
				Type: corev1.SecretType(pki.TokenType),
				Data: map[string][]byte{pki.TokenKeyHash: []byte(hash), pki.TokenKeyUser: []byte(name), pki.TokenKeyExpires: []byte(expires)},
			}
			if _, err := cs.CoreV1().Secrets(pki.TokenNamespace).Create(ctx, sec, metav1.CreateOptions{}); err != nil {
				return fmt.Errorf("keep the token: %w", err)
			}
			if err := bindUser(ctx, cs, g.namespace, name, role, o.also); err != nil {
				_ = cs.CoreV1().Secrets(pki.TokenNamespace).Delete(ctx, sec.Name, metav1.DeleteOptions{})
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), token)
			fmt.Fprintf(cmd.ErrOrStderr(), "token %s: user %s is %s in namespace %s until %s\n", id, name, role, g.namespace, expires)
			return nil
		},
	}
	o.grantFlags(cmd)
	cmd.Flags().StringVar(&role, "role", "", "the user's role in the namespace: "+strings.Join(v1alpha1.TenantRoles, ", "))
	cmd.Flags().DurationVar(&ttl, "ttl", defaultTokenTTL, fmt.Sprintf("how long the token lasts (%s to %s)", minUserTTL, maxUserTTL))
	return cmd
}

func tokenListCmd(g *globals) *cobra.Command {
	var o userOptions
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the tokens: id, user, expiry (never the tokens themselves)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cs, _, err := o.admin(g)
			if err != nil {
				return err
			}
			l, err := cs.CoreV1().Secrets(pki.TokenNamespace).List(cmd.Context(), metav1.ListOptions{})
			if err != nil && !apierrors.IsNotFound(err) {
				return err
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tUSER\tEXPIRES")
			if l != nil {
				for _, s := range l.Items {
					if s.Type != pki.TokenType {
						continue
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\n", strings.TrimPrefix(s.Name, "token-"), s.Data[pki.TokenKeyUser], s.Data[pki.TokenKeyExpires])
				}
			}
			return tw.Flush()
		},
	}
	o.flags(cmd)
	return cmd
}

func tokenDeleteCmd(g *globals) *cobra.Command {
	var o userOptions
	var user string
	cmd := &cobra.Command{
		Use:   "delete ID... | --user NAME",
		Short: "Revoke tokens, at once: by id, or all of a user's",
		RunE: func(cmd *cobra.Command, args []string) error {
			if (len(args) == 0) == (user == "") {
				return errors.New("give token ids, or --user NAME for all of a user's tokens")
			}
			cs, _, err := o.admin(g)
			if err != nil {
				return err
			}
			secrets := cs.CoreV1().Secrets(pki.TokenNamespace)
			ids := slices.Clone(args)
			if user != "" {
				l, err := secrets.List(cmd.Context(), metav1.ListOptions{LabelSelector: tokenUserLabel + "=" + user})
				if err != nil {
					return err
				}
				for _, s := range l.Items {
					ids = append(ids, strings.TrimPrefix(s.Name, "token-"))
				}
				if len(ids) == 0 {
					return fmt.Errorf("user %s has no tokens", user)
				}
			}
			for _, id := range ids {
				err := secrets.Delete(cmd.Context(), pki.TokenSecretName(id), metav1.DeleteOptions{})
				if apierrors.IsNotFound(err) {
					return fmt.Errorf("no token %s", id)
				}
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "token %s revoked\n", id)
			}
			return nil
		},
	}
	o.flags(cmd)
	cmd.Flags().StringVar(&user, "user", "", "revoke every token of this user")
	return cmd
}
