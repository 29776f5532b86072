// Package boltfile opens bbolt files that may be damaged (flash wears,
// power fails mid-write) so that damage is an error, never a crash.
//
// bbolt panics on a damaged page, and touching a page past the end of a
// truncated file is a fault (SIGBUS), which Go turns into a panic only when
// asked to, in the goroutine that asked. So a file is first opened
// read-only and every page reachable from its meta page is read in the
// caller's goroutine, where a panic or a fault is caught; only a file that
// passes is opened as asked. (bbolt itself walks the pages in a goroutine
// of its own when it rebuilds a freelist, where nothing can catch a panic:
// 2 KB of 0xff over the first page crashed bolt.Open that way, on every
// start of the agent.) Files should keep their freelist (the default), so
// later opens read it instead of rebuilding it.
package boltfile

import (
	"errors"
	"fmt"
	"os"
	"runtime/debug"

	bolt "go.etcd.io/bbolt"
)

// ErrDamaged wraps whatever a damaged file made bbolt do.
var ErrDamaged = errors.New("damaged file")

// Open opens path with opts after reading every page of it, if it exists.
// A damaged file is ErrDamaged; other failures (a lock held, a missing
// directory) are bbolt's errors.
func Open(path string, opts *bolt.Options) (db *bolt.DB, err error) {
	if _, serr := os.Stat(path); serr == nil {
		if err := probe(path, opts); err != nil {
			return nil, err
		}
	}
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer caught(&err)
	return bolt.Open(path, 0o600, opts)
}

// probe opens path read-only and reads every key and value of every
// bucket.
func probe(path string, opts *bolt.Options) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer caught(&err)
	ro := bolt.Options{ReadOnly: true}
	if opts != nil {
		ro.Timeout = opts.Timeout
	}
	db, err := bolt.Open(path, 0o600, &ro)
	if err != nil {
		return err
	}
	defer db.Close()
	return db.View(func(tx *bolt.Tx) error {
		return tx.ForEach(func(_ []byte, b *bolt.Bucket) error { return readAll(b) })
	})
}

// readAll touches every byte of b's keys and values, nested buckets too.
func readAll(b *bolt.Bucket) error {
	return b.ForEach(func(k, v []byte) error {
		if v == nil {
			if nested := b.Bucket(k); nested != nil {
				return readAll(nested)
			}
		}
		var sum byte
		for _, c := range v {
			sum ^= c
		}
		sink = sum
		return nil
	})
}

// sink keeps readAll's reads from being optimized away.
var sink byte

// caught turns a panic (or, with SetPanicOnFault, a fault) into
// ErrDamaged.
func caught(err *error) {
	if r := recover(); r != nil {
		*err = fmt.Errorf("%w: %v", ErrDamaged, r)
	}
}
