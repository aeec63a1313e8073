package apiserver

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apiserver/pkg/authentication/authenticator"
	"k8s.io/apiserver/pkg/authentication/user"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"

	"hearth.dev/hearth/internal/pki"
)

// tokenAuthenticator authenticates hearth's bearer tokens (pki.NewToken)
// against the Secrets that keep their hashes. It reads the Secret from
// storage at every request, not from a cache, so that deleting it
// revokes the token at once; a request with a token pays one read.
type tokenAuthenticator struct {
	secrets corev1client.SecretInterface // in pki.TokenNamespace, through the loopback
	now     func() time.Time
}

func (t *tokenAuthenticator) AuthenticateToken(ctx context.Context, token string) (*authenticator.Response, bool, error) {
	id, secret, ok := pki.ParseToken(token)
	if !ok {
		return nil, false, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	s, err := t.secrets.Get(ctx, pki.TokenSecretName(id), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("look up a token: %w", err)
	}
	if s.Type != corev1.SecretType(pki.TokenType) || !pki.TokenMatches(secret, string(s.Data[pki.TokenKeyHash])) {
		return nil, false, nil
	}
	if exp := string(s.Data[pki.TokenKeyExpires]); exp != "" {
		at, err := time.Parse(time.RFC3339, exp)
		if err != nil || !t.now().Before(at) {
			return nil, false, nil
		}
	}
	name := string(s.Data[pki.TokenKeyUser])
	if name == "" {
		return nil, false, nil
	}
	return &authenticator.Response{User: &user.DefaultInfo{Name: name, UID: "token-" + id}}, true, nil
}
