// Package opscli owns the security-operations command line,
// `bulkhead-control`: generating ops keys, validating and signing policy
// bundles and trust-root rotations. Signing happens here, on the ops side;
// the device binary only verifies.
package opscli

import (
	"crypto/ed25519"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/bulkhead-edge/bulkhead/internal/atomicfile"
	"github.com/bulkhead-edge/bulkhead/internal/subcmd"
	"github.com/bulkhead-edge/bulkhead/internal/version"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Root is the `bulkhead-control` command tree.
func Root() *subcmd.Command {
	return &subcmd.Command{
		Name:    "bulkhead-control",
		Summary: "bulkhead-control: security-operations tools for a Bulkhead fleet.",
		Sub: []*subcmd.Command{
			serveCmd(),
			migrateCmd(),
			keygenCmd(),
			tokenCmd(),
			{Name: "policy", Summary: "validate, sign and push policy bundles; draft rules from observed flows", Sub: []*subcmd.Command{validateCmd(), signCmd(), pushCmd(), withdrawCmd(), suggestCmd()}},
			devicesCmd(),
			deviceCmd(),
			commandCmd(command.Quarantine, "Quarantine devices: safety floor and control channel only, tunnels down, live flows cut.\nThe control key may sign it; it lasts until an ops-signed release."),
			commandCmd(command.Diagnostic, "Drop devices to diagnostic-only: the quarantine floor plus the diagnostics segment."),
			commandCmd(command.Release, "Return devices to normal. Needs the ops keys (--key)."),
			commandCmd(command.RevokePartner, "Cut a partner off every device: its peers and destinations are removed until reinstated."),
			commandCmd(command.ReinstatePartner, "Undo revoke-partner. Needs the ops keys (--key)."),
			ordersCmd(),
			auditCmd(),
			{Name: "roots", Summary: "sign trust-root rotations", Sub: []*subcmd.Command{rootsSignCmd()}},
			{Name: "version", Summary: "print the version", Flags: func(*flag.FlagSet) func(*subcmd.Env, []string) error {
				return func(env *subcmd.Env, _ []string) error {
					fmt.Fprintf(env.Stdout, "bulkhead-control %s\n", version.Version)
					return nil
				}
			}},
		},
	}
}

func keygenCmd() *subcmd.Command {
	return &subcmd.Command{
		Name:    "keygen",
		Summary: "Create an Ed25519 ops signing key: DIR/ops.key (0600, keep it offline) and DIR/ops.pub (give it to devices).",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			out := fs.String("out", "", "`DIR` to write ops.key and ops.pub into (created if missing)")
			return func(env *subcmd.Env, args []string) error {
				if *out == "" || len(args) > 0 {
					return subcmd.Usagef("keygen needs --out DIR and no other arguments")
				}
				pub, err := opskey.Generate(*out)
				if err != nil {
					return err
				}
				fmt.Fprintf(env.Stdout, "wrote %s (mode 0600) and %s\nkey id %s\n",
					filepath.Join(*out, opskey.PrivateFile), filepath.Join(*out, opskey.PublicFile), opskey.ID(pub))
				return nil
			}
		},
	}
}

func validateCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "validate", Args: "POLICY.json",
		Summary: "Check a policy document for unknown fields and contradictions; prints every problem.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			return func(env *subcmd.Env, args []string) error {
				if len(args) != 1 {
					return subcmd.Usagef("policy validate takes one policy file")
				}
				doc, err := readPolicy(args[0])
				if err != nil {
					return err
				}
				fmt.Fprintf(env.Stdout, "valid: %d segments, %d device classes, %d schedules\n", len(doc.Segments), len(doc.Classes), len(doc.Schedules))
				return nil
			}
		},
	}
}

func readPolicy(path string) (*policy.Document, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	doc, err := policy.Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return doc, nil
}

func loadKeys(files []string) ([]ed25519.PrivateKey, error) {
	if len(files) == 0 {
		return nil, subcmd.Usagef("give at least one --key ops.key")
	}
	keys := make([]ed25519.PrivateKey, len(files))
	for i, f := range files {
		k, err := opskey.LoadPrivate(f)
		if err != nil {
			return nil, err
		}
		for j, prev := range keys[:i] {
			if prev.Equal(k) {
				return nil, subcmd.Usagef("--key %s is the same key as --key %s: a threshold counts distinct keys, so give each key once", f, files[j])
			}
		}
		keys[i] = k
	}
	return keys, nil
}

func signCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "sign",
		Summary: "Sign a policy document into a bundle for devices. The policy is validated first;\n" +
			"the version must be above every version the target devices have accepted.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			var keys, classes, devices subcmd.Strings
			fs.Var(&keys, "key", "ops signing key `FILE`; repeat to add signatures up to the devices' threshold")
			in := fs.String("in", "", "policy document `FILE` (JSON, schema bulkhead.policy/v1)")
			version := fs.Uint64("version", 0, "bundle version `N`, above any the devices have accepted")
			fs.Var(&classes, "target", "device `CLASS` the bundle is for; repeatable")
			fs.Var(&devices, "device", "device `ID` the bundle is for; repeatable")
			validFor := fs.Duration("valid-for", 0, "how long the bundle may be installed, e.g. 720h; after that devices run its offline profile")
			out := fs.String("out", "", "where to write the bundle `FILE`")
			return func(env *subcmd.Env, args []string) error {
				switch {
				case len(args) > 0:
					return subcmd.Usagef("policy sign takes no arguments, got %q", args)
				case *in == "" || *out == "":
					return subcmd.Usagef("policy sign needs --in POLICY.json and --out BUNDLE")
				case *version == 0:
					return subcmd.Usagef("policy sign needs --version N (1 or more)")
				case len(classes) == 0 && len(devices) == 0:
					return subcmd.Usagef("policy sign needs --target CLASS or --device ID")
				case *validFor <= 0:
					return subcmd.Usagef("policy sign needs --valid-for DURATION, such as 720h")
				}
				privs, err := loadKeys(keys)
				if err != nil {
					return err
				}
				doc, err := readPolicy(*in)
				if err != nil {
					return err
				}
				now := time.Now().UTC().Truncate(time.Second)
				p := bundle.Payload{Version: *version, IssuedAt: now, ExpiresAt: now.Add(*validFor),
					Target: bundle.Target{Classes: classes, Devices: devices}, Policy: *doc}
				raw, err := bundle.Sign(p, privs...)
				if err != nil {
					return err
				}
				if err := atomicfile.Write(*out, raw, 0o644); err != nil {
					return err
				}
				fmt.Fprintf(env.Stdout, "wrote %s: policy version %d for %s, expires %s, %d signatures\n",
					*out, p.Version, p.Target, p.ExpiresAt.Format(time.RFC3339), len(privs))
				return nil
			}
		},
	}
}

func rootsSignCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "sign",
		Summary: "Sign a new trust-root set. Devices accept it only when a threshold of the current\n" +
			"keys and a threshold of the new keys have signed, so pass --key for both.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			var keys, pubs subcmd.Strings
			fs.Var(&keys, "key", "signing key `FILE` (current and new ops keys); repeatable")
			fs.Var(&pubs, "pub", "public key `FILE` of the new set; repeat for each")
			threshold := fs.Int("threshold", 0, "signatures the new set requires (default: all its keys)")
			version := fs.Uint64("version", 0, "root-set version `N`, above the current one")
			out := fs.String("out", "", "where to write the rotation `FILE`")
			return func(env *subcmd.Env, args []string) error {
				if len(args) > 0 || *out == "" || *version == 0 || len(pubs) == 0 {
					return subcmd.Usagef("roots sign needs --pub (repeatable), --version N, --key (repeatable) and --out FILE")
				}
				privs, err := loadKeys(keys)
				if err != nil {
					return err
				}
				newKeys, err := opskey.LoadPublicKeys(pubs)
				if err != nil {
					return err
				}
				next, err := opskey.NewRoots(opskey.OrAll(*threshold, len(newKeys)), newKeys...)
				if err != nil {
					return subcmd.Usagef("%v", err)
				}
				raw, err := bundle.SignRoots(bundle.NewRootSet(*version, next), privs...)
				if err != nil {
					return err
				}
				if err := atomicfile.Write(*out, raw, 0o644); err != nil {
					return err
				}
				fmt.Fprintf(env.Stdout, "wrote %s: root set version %d, %d keys, threshold %d\n", *out, *version, next.Len(), next.Threshold)
				return nil
			}
		},
	}
}
