package lab

import (
	"regexp"
	"slices"
	"strings"
)

var (
	listedCounters = regexp.MustCompile(`counter packets \d+ bytes \d+`)
	listedElements = regexp.MustCompile(`(?s)elements = \{(.*?)\}`)
)

// CanonicalTable is an `nft list table` listing reduced to what a table
// holds, not how the kernel happens to list it: sets, maps and chains in
// name order, each set's elements sorted, and packet counters dropped.
// The kernel lists objects in creation order and an interval set's
// elements in the order they were added, so two equal tables reached
// along different paths (a set kept across applies, an element taken out
// and put back) list differently; everything else stays, so a real
// difference still shows.
func CanonicalTable(listing string) string {
	listing = listedCounters.ReplaceAllString(listing, "counter")
	listing = listedElements.ReplaceAllStringFunc(listing, func(m string) string {
		inner := listedElements.FindStringSubmatch(m)[1]
		var elems []string
		for _, e := range strings.Split(inner, ",") {
			elems = append(elems, strings.Join(strings.Fields(e), " "))
		}
		slices.Sort(elems)
		return "elements = { " + strings.Join(elems, ", ") + " }"
	})
	body := strings.TrimSpace(listing)
	head, rest, _ := strings.Cut(body, "\n")
	rest = strings.TrimSuffix(rest, "}")
	blocks := strings.Split(strings.TrimSpace(rest), "\n\n")
	for i := range blocks {
		blocks[i] = strings.TrimSpace(blocks[i])
	}
	slices.Sort(blocks)
	return head + "\n" + strings.Join(blocks, "\n\n") + "\n}"
}
