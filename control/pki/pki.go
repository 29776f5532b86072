// Package pki owns the control server's certificate authority: created on
// first start, it issues the server's TLS certificate and the client
// certificates that identify devices (bound to their identity keys) and
// security operators. Its fingerprint is what installers pin.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/bulkhead-edge/bulkhead/internal/atomicfile"
)

// Files in the CA directory.
const (
	CertFile = "ca.crt"
	KeyFile  = "ca.key"
)

// An operator's credentials directory holds the CA's certificate
// (CertFile), the operator's certificate and its key; serve writes the
// first operator's to DATA/AdminDir.
const (
	AdminDir  = "admin"
	AdminCert = "admin.crt"
	AdminKey  = "admin.key"
)

// How long what the CA issues is valid.
const (
	caValidity     = 20 * 365 * 24 * time.Hour
	leafValidity   = 2 * 365 * 24 * time.Hour
	backdateLeaves = time.Hour // tolerate clocks a little behind
)

// CA is a loaded certificate authority.
type CA struct {
	Cert *x509.Certificate
	key  crypto.Signer
}

// LoadOrCreate loads the CA in dir, or creates it (key mode 0600) when
// neither file exists. One file without the other is an error, not a
// reason to make a new CA that every enrolled device would refuse.
func LoadOrCreate(dir string) (ca *CA, created bool, err error) {
	certPath, keyPath := filepath.Join(dir, CertFile), filepath.Join(dir, KeyFile)
	_, certErr := os.Stat(certPath)
	_, keyErr := os.Stat(keyPath)
	if errors.Is(certErr, fs.ErrNotExist) && errors.Is(keyErr, fs.ErrNotExist) {
		ca, err := create(certPath, keyPath)
		return ca, err == nil, err
	}
	if certErr != nil || keyErr != nil {
		return nil, false, fmt.Errorf("CA in %s is incomplete (%v, %v); restore both %s and %s from backup", dir, certErr, keyErr, CertFile, KeyFile)
	}
	cert, err := ReadCert(certPath)
	if err != nil {
		return nil, false, err
	}
	key, err := ReadKey(keyPath)
	if err != nil {
		return nil, false, err
	}
	return &CA{Cert: cert, key: key}, false, nil
}

func create(certPath, keyPath string) (*CA, error) {
	if err := os.MkdirAll(filepath.Dir(certPath), 0o700); err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "Bulkhead control CA"},
		NotBefore:             now.Add(-backdateLeaves),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	if err := WriteKey(keyPath, key); err != nil {
		return nil, err
	}
	if err := WriteCert(certPath, der); err != nil {
		return nil, err
	}
	cert, _ := x509.ParseCertificate(der)
	return &CA{Cert: cert, key: key}, nil
}

// ServerCert issues a fresh TLS server certificate for names (DNS names
// or IP addresses), chained to the CA.
func (ca *CA) ServerCert(names []string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := ca.leaf(pkix.Name{CommonName: "Bulkhead control"}, x509.ExtKeyUsageServerAuth)
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.Cert.Raw}, PrivateKey: key}, nil
}

// ClientCert issues a client certificate for pub whose URI SANs are uris
// (the first says what it is for: controlapi.DeviceURIPrefix+id, or
// OpsURIPrefix+name; a device's may add its tunnel binding) and whose IP
// SANs are ips.
func (ca *CA) ClientCert(pub crypto.PublicKey, commonName string, uris []string, ips ...netip.Addr) ([]byte, error) {
	tmpl := ca.leaf(pkix.Name{CommonName: commonName}, x509.ExtKeyUsageClientAuth)
	for _, raw := range uris {
		u, err := url.Parse(raw)
		if err != nil {
			return nil, err
		}
		tmpl.URIs = append(tmpl.URIs, u)
	}
	for _, ip := range ips {
		tmpl.IPAddresses = append(tmpl.IPAddresses, ip.AsSlice())
	}
	return x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.key)
}

func (ca *CA) leaf(subject pkix.Name, usage x509.ExtKeyUsage) *x509.Certificate {
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: serial(),
		Subject:      subject,
		NotBefore:    now.Add(-backdateLeaves),
		NotAfter:     now.Add(leafValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
	}
}

// Pool is a cert pool holding only the CA.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

// ReadCert reads one PEM certificate.
func ReadCert(path string) (*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s: no PEM certificate", path)
	}
	return x509.ParseCertificate(block.Bytes)
}

// WriteCert writes der as a PEM certificate (mode 0644).
func WriteCert(path string, der []byte) error {
	return atomicfile.Write(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

// ReadKey reads a PKCS#8 PEM private key and refuses one others can read.
func ReadKey(path string) (crypto.Signer, error) {
	info, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if info.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s is readable by others (mode %v); chmod 600 it", path, info.Mode().Perm())
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("%s: no PEM private key", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("%s: key cannot sign", path)
	}
	return s, nil
}

// WriteKey writes key as PKCS#8 PEM, mode 0600.
func WriteKey(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return atomicfile.Write(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
}
