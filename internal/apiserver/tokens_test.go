package apiserver

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"hearth.dev/hearth/internal/pki"
)

func TestTokenAuthenticator(t *testing.T) {
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	cs := fake.NewClientset()
	secrets := cs.CoreV1().Secrets(pki.TokenNamespace)
	a := &tokenAuthenticator{secrets: secrets, now: func() time.Time { return now }}
	ctx := context.Background()
	mint := func(user, expires string, typ corev1.SecretType) string {
		token, id, hash, err := pki.NewToken()
		if err != nil {
			t.Fatal(err)
		}
		_, err = secrets.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: pki.TokenNamespace, Name: pki.TokenSecretName(id)}, Type: typ,
			Data: map[string][]byte{pki.TokenKeyHash: []byte(hash), pki.TokenKeyUser: []byte(user), pki.TokenKeyExpires: []byte(expires)}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return token
	}
	good := mint("ci", now.Add(time.Hour).Format(time.RFC3339), pki.TokenType)
	resp, ok, err := a.AuthenticateToken(ctx, good)
	if !ok || err != nil || resp.User.GetName() != "ci" || len(resp.User.GetGroups()) != 0 {
		t.Fatalf("a good token: %v %v %+v", ok, err, resp)
	}
	id, secret, _ := pki.ParseToken(good)
	other := "A"
	if secret[42:] == other {
		other = "B"
	}
	for name, token := range map[string]string{
		"expired":         mint("ci", now.Add(-time.Second).Format(time.RFC3339), pki.TokenType),
		"bad expiry":      mint("ci", "soon", pki.TokenType),
		"not a token's":   mint("ci", "", corev1.SecretTypeOpaque),
		"no user":         mint("", "", pki.TokenType),
		"wrong secret":    pki.TokenPrefix + id + "." + secret[:42] + other,
		"not hearth's":    "eyJhbGciOi.xxx",
		"unknown id":      pki.TokenPrefix + "0123456789ab." + secret,
		"id not hex":      pki.TokenPrefix + "0123456789xz." + secret,
		"secret too long": good + "A",
	} {
		if resp, ok, err := a.AuthenticateToken(ctx, token); ok || err != nil {
			t.Errorf("%s: authenticated %v (%v, %+v)", name, ok, err, resp)
		}
	}
	// Revoked: the Secret is gone, and so is the token's next request.
	if err := secrets.Delete(ctx, pki.TokenSecretName(id), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := a.AuthenticateToken(ctx, good); ok || err != nil {
		t.Errorf("a revoked token: %v %v", ok, err)
	}
}
