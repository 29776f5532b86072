package opscli

import (
	"context"
	"flag"
	"fmt"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/bulkhead-edge/bulkhead/control/server"
	"github.com/bulkhead-edge/bulkhead/control/store/boltstore"
	"github.com/bulkhead-edge/bulkhead/control/store/pgstore"
	"github.com/bulkhead-edge/bulkhead/internal/subcmd"
)

func migrateCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "migrate",
		Summary: "Move a site's control state from its bbolt file (DIR/control.db) into an empty PostgreSQL\n" +
			"database, in one transaction: devices, tokens, bundles, rotations, orders, reports, flows,\n" +
			"the audit log and every counter. Stop `serve` first (it holds the file); then start each\n" +
			"replica with --db URL and DIR's ca.crt, ca.key and command.key. The file is only read.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			from := fs.String("from", DefaultData, "data `DIR` of the server being moved")
			to := fs.String("to", "", "PostgreSQL `URL` (postgres://user@host/db) of an empty database (required)")
			return func(env *subcmd.Env, args []string) error {
				if len(args) > 0 {
					return subcmd.Usagef("migrate takes no arguments, got %q", args)
				}
				if !strings.HasPrefix(*to, "postgres://") && !strings.HasPrefix(*to, "postgresql://") {
					return subcmd.Usagef("--to %q: a PostgreSQL URL, postgres://user@host/database", *to)
				}
				path := filepath.Join(*from, server.DBFile)
				src, err := boltstore.OpenReadOnly(path)
				if err != nil {
					return fmt.Errorf("--from: %w", err)
				}
				defer src.Close()
				ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
				defer stop()
				dst, err := pgstore.Open(ctx, *to, nil)
				if err != nil {
					return fmt.Errorf("--to: %w", err)
				}
				defer dst.Close()
				n, err := dst.Import(ctx, src.Export)
				if err != nil {
					return fmt.Errorf("migrate: %w; nothing was written", err)
				}
				fmt.Fprintf(env.Stdout, "moved %d records from %s into the database (schema version %d)\n"+
					"next: copy %s's ca.crt, ca.key and command.key to each replica's data directory, and start each with --db\n", n, path, pgstore.Schema(), *from)
				return nil
			}
		},
	}
}
