// Package examples holds the example policies: files for people to read and
// copy, and the same bytes embedded for tests, fuzz seeds and benchmarks. The
// agent binary does not import it.
package examples

import "embed"

//go:embed *.json
var files embed.FS

// Site is logistics-site.json: every scenario of the article in one policy.
func Site() []byte { return mustRead("logistics-site.json") }

// All returns every example policy by file name.
func All() map[string][]byte {
	entries, err := files.ReadDir(".")
	if err != nil {
		panic(err)
	}
	out := make(map[string][]byte, len(entries))
	for _, e := range entries {
		out[e.Name()] = mustRead(e.Name())
	}
	return out
}

func mustRead(name string) []byte {
	b, err := files.ReadFile(name)
	if err != nil {
		panic(err) // embedded at build time; a miss is a build defect
	}
	return b
}
