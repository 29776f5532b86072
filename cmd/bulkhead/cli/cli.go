// Package cli owns the device-side command line, `bulkhead`: each
// subcommand's flags, help and output. The daemon and the enforcement live
// elsewhere; this package only parses, calls, and prints.
package cli

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/bulkhead-edge/bulkhead/internal/subcmd"
	"github.com/bulkhead-edge/bulkhead/internal/version"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
)

// Root is the `bulkhead` command tree.
func Root() *subcmd.Command {
	return &subcmd.Command{
		Name:    "bulkhead",
		Summary: "bulkhead: the zero-trust edge agent for logistics devices.",
		Sub: []*subcmd.Command{
			runCmd(),
			statusCmd(),
			explainCmd(),
			{Name: "policy", Summary: "verify signed policy bundles, or hand one to the agent", Sub: []*subcmd.Command{verifyCmd(), applyCmd()}},
			rotateKeyCmd(),
			installCmd(),
			uninstallCmd(),
			enrollCmd(),
			cleanupCmd(),
			recoverCacheCmd(),
			versionCmd(),
		},
	}
}

func versionCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "version", Summary: "print the agent version",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			return func(env *subcmd.Env, args []string) error {
				fmt.Fprintf(env.Stdout, "bulkhead %s\n", version.Version)
				return nil
			}
		},
	}
}

func verifyCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "verify", Args: "BUNDLE",
		Summary: "Check a policy bundle's signatures, payload and validity, and print what it is.\n" +
			"Exits 0 for a bundle a device would accept (version aside), 1 with the reason otherwise.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			var trust subcmd.Strings
			fs.Var(&trust, "trust", "ops public key `FILE` (ops.pub) to trust; repeat for each key")
			threshold := fs.Int("threshold", 0, "how many trusted keys must have signed (default: all of them)")
			class := fs.String("class", "", "also check the bundle targets this device `CLASS`")
			device := fs.String("device", "", "also check the bundle targets this device `ID`")
			at := fs.String("at", "", "judge validity at this RFC 3339 `TIME` instead of now")
			return func(env *subcmd.Env, args []string) error {
				if len(args) != 1 {
					return subcmd.Usagef("policy verify takes one bundle file, got %d arguments", len(args))
				}
				if len(trust) == 0 {
					return subcmd.Usagef("policy verify needs at least one --trust ops.pub")
				}
				now := time.Now()
				if *at != "" {
					t, err := time.Parse(time.RFC3339, *at)
					if err != nil {
						return subcmd.Usagef("--at %q is not an RFC 3339 time such as 2026-11-24T12:00:00Z", *at)
					}
					now = t
				}
				roots, err := loadRoots(trust, *threshold)
				if err != nil {
					return err
				}
				return verify(env, args[0], roots, now, bundle.Device{Class: *class, ID: *device})
			}
		},
	}
}

func loadRoots(files []string, threshold int) (opskey.Roots, error) {
	keys, err := opskey.LoadPublicKeys(files)
	if err != nil {
		return opskey.Roots{}, err
	}
	roots, err := opskey.NewRoots(opskey.OrAll(threshold, len(keys)), keys...)
	if err != nil {
		return opskey.Roots{}, subcmd.Usagef("%v", err)
	}
	return roots, nil
}

func verify(env *subcmd.Env, path string, roots opskey.Roots, now time.Time, dev bundle.Device) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	b, err := bundle.Read(f, roots)
	if err == nil {
		if dev != (bundle.Device{}) {
			err = b.Admit(now, 0, dev)
		} else {
			err = b.CheckTime(now)
		}
	}
	if err != nil {
		return fmt.Errorf("%s rejected: %w", path, err)
	}
	short := make([]string, len(b.Signers))
	for i, s := range b.Signers {
		short[i] = envelope.Short(s)
	}
	fmt.Fprintf(env.Stdout, "valid: policy version %d for %s\n", b.Version, b.Target)
	fmt.Fprintf(env.Stdout, "  issued   %s\n", b.IssuedAt.UTC().Format(time.RFC3339))
	fmt.Fprintf(env.Stdout, "  expires  %s (in %s)\n", b.ExpiresAt.UTC().Format(time.RFC3339), b.ExpiresAt.Sub(now).Round(time.Minute))
	fmt.Fprintf(env.Stdout, "  signed   by %d trusted keys (threshold %d of %d): %s\n", len(b.Signers), roots.Threshold, roots.Len(), strings.Join(short, ", "))
	fmt.Fprintf(env.Stdout, "  policy   %d segments, %d device classes\n", len(b.Policy.Segments), len(b.Policy.Classes))
	return nil
}
