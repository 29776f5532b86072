package pki

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"path/filepath"
	"testing"
)

// The CA is created once and loaded after; a client certificate binds
// the key it was asked for and the URI that names the device, and
// verifies under the CA's pool for client authentication only.
func TestCAIssuesBoundClientCertificates(t *testing.T) {
	dir := t.TempDir()
	ca, created, err := LoadOrCreate(dir)
	if err != nil || !created {
		t.Fatalf("create: %v, created %v", err, created)
	}
	again, created, err := LoadOrCreate(dir)
	if err != nil || created || !again.Cert.Equal(ca.Cert) {
		t.Fatalf("load: %v, created %v, same CA %v", err, created, err == nil && again.Cert.Equal(ca.Cert))
	}
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	der, err := ca.ClientCert(pub, "device dev-1", []string{"bulkhead://device/dev-1"})
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if !pub.Equal(cert.PublicKey) || len(cert.URIs) != 1 || cert.URIs[0].String() != "bulkhead://device/dev-1" {
		t.Errorf("certificate key %v, URIs %v", cert.PublicKey, cert.URIs)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("client certificate does not verify for client auth: %v", err)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err == nil {
		t.Error("a client certificate verifies as a server's")
	}
}

// Keys and certificates written are read back as they were.
func TestKeyAndCertRoundTrip(t *testing.T) {
	dir := t.TempDir()
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	if err := WriteKey(filepath.Join(dir, "k"), priv); err != nil {
		t.Fatal(err)
	}
	k, err := ReadKey(filepath.Join(dir, "k"))
	if err != nil || !priv.Public().(ed25519.PublicKey).Equal(k.Public()) {
		t.Fatalf("ReadKey: %v", err)
	}
	ca, _, err := LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := WriteCert(filepath.Join(dir, "c"), ca.Cert.Raw); err != nil {
		t.Fatal(err)
	}
	c, err := ReadCert(filepath.Join(dir, "c"))
	if err != nil || !c.Equal(ca.Cert) {
		t.Fatalf("ReadCert: %v", err)
	}
	if _, err := ReadCert(filepath.Join(dir, "k")); err == nil {
		t.Error("a key read as a certificate")
	}
}
