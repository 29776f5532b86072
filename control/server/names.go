package server

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
)

// names are what an order may name: the classes and partners of the
// stored policies that devices take, the enrolled devices, and the
// partners earlier orders named (a reinstatement may follow a partner
// out of the policy).
type names struct {
	classes, partners, devices, segments map[string]bool
}

// names are read from classes (the enrolled devices' classes, by id),
// the stored bundles and the order book.
func (s *Server) names(classes map[string]string) (names, error) {
	n := names{classes: map[string]bool{}, partners: map[string]bool{}, devices: map[string]bool{}, segments: map[string]bool{}}
	for id, class := range classes {
		n.devices[id], n.classes[class] = true, true
	}
	err := s.db.Bundles(func(v uint64, raw []byte) {
		if s.isUnverified(v) {
			return
		}
		p, err := bundle.Peek(raw)
		if err != nil {
			return
		}
		for c := range p.Policy.Classes {
			n.classes[c] = true
		}
		for _, seg := range p.Policy.Segments {
			n.segments[seg.Name] = true
			if seg.Partner != "" {
				n.partners[seg.Partner] = true
			}
		}
	})
	for _, o := range s.book.all() {
		if o.Command.Partner != "" {
			n.partners[o.Command.Partner] = true
		}
	}
	return n, err
}

// check names every name in c that matches nothing, with the closest
// known names.
func (n names) check(c command.Command) error {
	var errs []string
	for _, d := range c.Target.Devices {
		errs = append(errs, unknownName("device", d, n.devices)...)
	}
	for _, cl := range c.Target.Classes {
		errs = append(errs, unknownName("class", cl, n.classes)...)
	}
	if c.Partner != "" {
		errs = append(errs, unknownName("partner", c.Partner, n.partners)...)
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s; nothing was ordered", strings.Join(errs, "; "))
	}
	return nil
}

// unknownName is the error for a name not among known, or nothing.
func unknownName(what, name string, known map[string]bool) []string {
	if known[name] {
		return nil
	}
	all := slices.Sorted(maps.Keys(known))
	if len(all) == 0 {
		return []string{fmt.Sprintf("no %s is named %q (none is known yet)", what, name)}
	}
	slices.SortStableFunc(all, func(a, b string) int { return distance(name, a) - distance(name, b) })
	return []string{fmt.Sprintf("no %s is named %q; closest: %s", what, name, strings.Join(all[:min(3, len(all))], ", "))}
}

// distance is the edit distance between a and b; a name typed short
// (contained in b) is closest of all.
func distance(a, b string) int {
	if strings.Contains(b, a) {
		return 0
	}
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			sub := prev[j-1]
			if a[i-1] != b[j-1] {
				sub++
			}
			cur[j] = min(sub, prev[j]+1, cur[j-1]+1)
		}
		prev = cur
	}
	return prev[len(b)]
}
