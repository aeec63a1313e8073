package pki

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"strings"
)

// Bearer tokens, for programs: "hearth_ID.SECRET". The API server keeps
// only the secret's SHA-256, in a Secret named token-ID of type TokenType
// in TokenNamespace, where only the admin reads: deleting that Secret
// revokes the token at its next request.
const (
	TokenNamespace = "hearth-system"
	TokenType      = "hearth.dev/token"
	TokenPrefix    = "hearth_"
	// Keys of the token's Secret.
	TokenKeyHash    = "sha256"
	TokenKeyUser    = "user"
	TokenKeyExpires = "expires" // RFC 3339
)

// NewToken makes a token: what the user is given, its id and the hash
// to keep.
func NewToken() (token, id, hash string, err error) {
	b := make([]byte, 6+32)
	if _, err := rand.Read(b); err != nil {
		return "", "", "", err
	}
	id = hex.EncodeToString(b[:6])
	secret := base64.RawURLEncoding.EncodeToString(b[6:])
	return TokenPrefix + id + "." + secret, id, HashTokenSecret(secret), nil
}

// TokenSecretName is the name of the Secret that keeps token id.
func TokenSecretName(id string) string { return "token-" + id }

// ParseToken splits a token into its id and secret; ok is false for
// anything that is not one of hearth's tokens.
func ParseToken(token string) (id, secret string, ok bool) {
	rest, ok := strings.CutPrefix(token, TokenPrefix)
	if !ok {
		return "", "", false
	}
	id, secret, ok = strings.Cut(rest, ".")
	if !ok || len(id) != 12 || len(secret) != 43 {
		return "", "", false
	}
	if _, err := hex.DecodeString(id); err != nil {
		return "", "", false
	}
	return id, secret, true
}

// HashTokenSecret is what is kept of a token's secret.
func HashTokenSecret(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(sum[:])
}

// TokenMatches says, in constant time, whether secret is the one hash was
// made from.
func TokenMatches(secret, hash string) bool {
	return subtle.ConstantTimeCompare([]byte(HashTokenSecret(secret)), []byte(hash)) == 1
}
