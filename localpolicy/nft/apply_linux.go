package nft

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Enforcer applies Rulesets to the kernel of one network namespace. Its
// methods are safe for concurrent use.
type Enforcer struct {
	netns int // namespace fd, or -1 for the caller's namespace

	mu      sync.Mutex
	applied *Ruleset // the last ruleset applied; guarded by mu
	// last is the ruleset the kernel holds as far as this Enforcer knows
	// (nil when unknown: before the first apply, after a drift); its sets
	// are changed element by element. Guarded by mu.
	last *Ruleset
	// gen asks for the ruleset generation; verified is the generation at
	// which the kernel last compared equal to last, valid when verifiedOK.
	// Guarded by mu.
	gen        *genSocket
	verified   uint32
	verifiedOK bool
	// beforeFlush, when set (by tests), runs between reading the kernel's
	// table and sending the batch built from it: a race made to order.
	beforeFlush func()
}

// Option configures an Enforcer.
type Option func(*Enforcer)

// WithNetNS targets the network namespace open at fd (tests use it; the
// agent enforces in its own namespace).
func WithNetNS(fd int) Option { return func(e *Enforcer) { e.netns = fd } }

// NetNS is the namespace the Enforcer enforces in: a file descriptor, or
// -1 for the caller's. What its table logs is read there too.
func (e *Enforcer) NetNS() int { return e.netns }

// NewEnforcer returns an Enforcer. It touches nothing until Apply.
func NewEnforcer(opts ...Option) *Enforcer {
	e := &Enforcer{netns: -1}
	for _, o := range opts {
		o(e)
	}
	return e
}

func (e *Enforcer) conn() (*nftables.Conn, error) { return e.connFor(0) }

// connFor opens a connection whose buffers fit a batch of that many set
// elements. The whole table goes in one sendmsg (that is what makes it one
// transaction), and the default socket buffer (~200 KB on most devices)
// holds only a few thousand elements, so, as nft(8) does, the send buffer
// is forced to the batch's size (root may exceed wmem_max). The kernel
// answers every message of the batch (an acknowledgement, and each new
// rule echoed back) before the first answer is read, so the receive
// buffer grows with the batch too: without it a table of 15,000 elements
// in 20 maps was applied and then reported as ENOBUFS.
func (e *Enforcer) connFor(elements int) (*nftables.Conn, error) {
	size := 1<<20 + elements*256
	opts := []nftables.ConnOption{nftables.WithSockOptions(func(c *netlink.Conn) error {
		// Acknowledgements need not carry each message back.
		return errors.Join(c.SetOption(netlink.CapAcknowledge, true), forceBuffers(c, size))
	})}
	if e.netns >= 0 {
		opts = append(opts, nftables.WithNetNSFd(e.netns))
	}
	return nftables.New(opts...)
}

// forceBuffers sets both socket buffers to size, beyond the system's
// limits when the caller may (root), else as far as they allow.
func forceBuffers(c *netlink.Conn, size int) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		for _, opt := range [][2]int{{unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}, {unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}} {
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt[0], size) != nil {
				// Not root: the ordinary limit is all there is.
				serr = errors.Join(serr, unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt[1], size))
			}
		}
	})
	return errors.Join(err, serr)
}

// elementsPerMessage bounds the elements sent in one netlink message: an
// IPv6 element encodes to about 100 bytes, and an attribute holds 64 KiB.
const elementsPerMessage = 256

var table = &nftables.Table{Family: nftables.TableFamilyINet, Name: Table}

// Apply replaces the table's contents with rs in one netlink transaction:
// the kernel applies all of it or none of it, so a reader never sees half a
// policy and a failure leaves the previous ruleset in force. Flows whose
// set changes little or not at all lose no packet (see applyLocked). An rs equal to
// the last one applied is a no-op (changed is false).
func (e *Enforcer) Apply(rs Ruleset) (changed bool, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.applied != nil && rs.Equal(*e.applied) {
		return false, nil
	}
	// What was verified was another ruleset; even a refused transaction
	// (which leaves the generation where it was) must not let Verify
	// vouch for this one.
	e.verifiedOK = false
	if e.last == nil && e.check(rs) == nil {
		// The kernel already enforces exactly rs (an agent restarted over
		// the table it left): nothing to touch.
		e.applied, e.last = &rs, &rs
		return false, nil
	}
	err = e.applyLocked(rs, e.last)
	if err != nil && e.last != nil {
		// The kernel was not what we thought (edited behind our back and
		// not yet noticed): replace everything instead.
		err = e.applyLocked(rs, nil)
	}
	if err != nil {
		e.last = nil
		return false, err
	}
	e.applied, e.last = &rs, &rs
	return true, nil
}

// Reapply applies rs even if it equals the last one applied: the repair
// after drift, when nothing in the table can be trusted.
func (e *Enforcer) Reapply(rs Ruleset) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.verifiedOK = false
	if err := e.applyLocked(rs, nil); err != nil {
		e.last = nil
		return err
	}
	e.applied, e.last = &rs, &rs
	return nil
}

// applyLocked makes the table rs in one transaction. prev is what the
// kernel holds, if known: its sets that rs keeps are changed element by
// element; otherwise sets are made afresh.
//
// The batch is built against what the kernel held when it was read; a
// change in between (another tool, or an attacker racing a repair) could
// otherwise survive it. The ruleset generation moves by exactly one per
// committed transaction, so it is read before the table and again after
// the commit: if it moved by more than our own commit (or moved at all
// under a refused batch), someone else committed in between, and the
// table is read and the batch built again. (google/nftables v0.3.0 cannot
// send a batch bound to a generation; the release that can does not build
// for 32-bit ARM.)
func (e *Enforcer) applyLocked(rs Ruleset, prev *Ruleset) error {
	n := 0
	for _, s := range rs.Sets {
		n += len(s.Elements)
	}
	for attempt := 1; ; attempt++ {
		before, genErr := e.generation()
		c, err := e.connFor(n)
		if err != nil {
			return fmt.Errorf("nftables: %w", err)
		}
		old, err := e.current(c)
		if err != nil {
			return err
		}
		if err := queue(c, rs, prev, old); err != nil {
			return err
		}
		if e.beforeFlush != nil {
			e.beforeFlush()
		}
		err = c.Flush()
		if genErr == nil && attempt < maxRaces && e.raced(before, err == nil) {
			prev = nil // what was read is stale: make every set afresh
			continue
		}
		if err != nil {
			return fmt.Errorf("nftables: apply table inet %s: %w", Table, err)
		}
		return nil
	}
}

// raced reports whether a transaction other than ours was committed since
// the generation read before: ours, if committed, accounts for one step.
// A generation that cannot be read counts as a race, so the table is read
// and built again rather than trusted.
func (e *Enforcer) raced(before uint32, committed bool) bool {
	after, err := e.generation()
	if err != nil {
		return true
	}
	want := before
	if committed {
		if want++; want == 0 {
			want = 1 // the kernel skips 0 when it wraps
		}
	}
	return after != want
}

// maxRaces bounds how often an apply is built again because the ruleset
// changed while it was being built.
const maxRaces = 5

// queue buffers on c the transaction that turns old (what the kernel
// holds) into rs. It reads nothing and depends on nothing but its
// arguments: the same rs over the same table gives the same batch.
//
// The table and its base chains stay, and so does every set whose
// contents are known, changed by element diffs when they are small. A set
// made in a transaction is empty to lookups for a moment after it
// commits, so deleting and re-adding everything (atomic for readers all
// the same) dropped packets of flows both the old and the new ruleset
// allow: 2-5 per 100 applies in TestReplacingTheTableDropsNothing. But
// element updates in an existing interval set cost the kernel time in
// proportion to the set's size, each (8.5 s to rewrite 10,000
// destinations in place, 65 ms afresh), so a set that changes a lot is
// made afresh: only its own flows can see that moment.
//
// The order inside the batch is what the kernel's references need: rules
// go (chains flushed) before the sets they look up, map elements before
// the chains they jump to; chains exist before the map elements that
// jump to them, and sets before the rules that look them up.
func queue(c *nftables.Conn, rs Ruleset, prev *Ruleset, old contents) error {
	known := map[string]Set{}
	if prev != nil {
		for _, s := range prev.Sets {
			known[s.Name] = s
		}
	}
	c.AddTable(table)
	wantChain := map[string]bool{}
	for _, ch := range rs.Chains {
		wantChain[ch.Name] = true
	}
	for _, ch := range old.chains {
		c.FlushChain(ch)
	}
	type diff struct{ add, del []Element }
	keep := map[string]diff{} // sets changed in place, and how
	for _, s := range rs.Sets {
		if have, ok := known[s.Name]; ok && have.sameKind(s) {
			if add, del := diffElements(have.Elements, s.Elements); len(add)+len(del) <= diffLimit {
				keep[s.Name] = diff{add, del}
			}
		}
	}
	for _, s := range old.sets {
		if _, ok := keep[s.Name]; !ok {
			c.DelSet(s)
		}
	}
	sets := map[string]*nftables.Set{}
	for i, s := range rs.Sets {
		ns := nfSet(s)
		// Set ids name sets within one transaction; numbering them here
		// (not from the library's process-wide counter) keeps the batch
		// a function of rs.
		ns.ID = uint32(i + 1)
		sets[s.Name] = ns
		// google/nftables puts all elements of one call in a single
		// netlink attribute, whose 16-bit length silently wraps past ~1,000
		// elements and the kernel stores a truncated set. Chunks keep each
		// message well under 64 KiB; they are still one transaction.
		for chunk := range slices.Chunk(nfElements(s, keep[s.Name].del), elementsPerMessage) {
			if err := c.SetDeleteElements(ns, chunk); err != nil {
				return fmt.Errorf("nftables: set %s: %w", s.Name, err)
			}
		}
	}
	for _, ch := range old.chains {
		if !wantChain[ch.Name] {
			c.DelChain(ch) // gone from rs, or added by someone else
		}
	}
	chains := map[string]*nftables.Chain{}
	for _, ch := range rs.Chains {
		// On an existing base chain this restores hook, priority and
		// policy should someone have changed them.
		nc := &nftables.Chain{Name: ch.Name, Table: table}
		if ch.Hook != "" {
			nc.Type, nc.Hooknum, nc.Priority, nc.Policy = nftables.ChainTypeFilter, hook(ch.Hook), nftables.ChainPriorityFilter, ptr(nftables.ChainPolicyDrop)
		}
		chains[ch.Name] = c.AddChain(nc)
	}
	for _, s := range rs.Sets {
		ns := sets[s.Name]
		d, inPlace := keep[s.Name]
		if !inPlace {
			if err := c.AddSet(ns, nil); err != nil {
				return fmt.Errorf("nftables: set %s: %w", s.Name, err)
			}
			d.add = s.Elements
		}
		for chunk := range slices.Chunk(nfElements(s, d.add), elementsPerMessage) {
			if err := c.SetAddElements(ns, chunk); err != nil {
				return fmt.Errorf("nftables: set %s: %w", s.Name, err)
			}
		}
	}
	for _, ch := range rs.Chains {
		for _, r := range ch.Rules {
			exprs, err := r.exprs(ch.Hook, sets)
			if err != nil {
				return err
			}
			c.AddRule(&nftables.Rule{Table: table, Chain: chains[ch.Name], Exprs: exprs,
				UserData: userdata.AppendString(nil, userdata.TypeComment, r.Comment)})
		}
	}
	return nil
}

// contents is what the kernel holds in the agent's table now; present is
// false when there is no table (first boot, or deleted by someone).
type contents struct {
	present bool
	chains  []*nftables.Chain
	sets    []*nftables.Set
}

func (e *Enforcer) current(c *nftables.Conn) (contents, error) {
	var out contents
	if t, err := c.ListTableOfFamily(Table, nftables.TableFamilyINet); err != nil || t == nil {
		return out, nil
	}
	out.present = true
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return out, fmt.Errorf("nftables: list chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table.Name == Table {
			out.chains = append(out.chains, ch)
		}
	}
	if out.sets, err = c.GetSets(table); err != nil {
		return out, fmt.Errorf("nftables: list sets: %w", err)
	}
	return out, nil
}

// Present reports whether the kernel holds the agent's table, whatever is
// in it.
func (e *Enforcer) Present() (bool, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	c, err := e.conn()
	if err != nil {
		return false, fmt.Errorf("nftables: %w", err)
	}
	have, err := e.current(c)
	return have.present, err
}

// Remove deletes the table and reports whether there was one; a missing
// table is not an error. Only an explicit cleanup or uninstall calls
// this: the table outlives the agent.
func (e *Enforcer) Remove() (removed bool, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	c, err := e.conn()
	if err != nil {
		return false, fmt.Errorf("nftables: %w", err)
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, fmt.Errorf("nftables: list tables: %w", err)
	}
	if !slices.ContainsFunc(tables, func(t *nftables.Table) bool { return t.Name == Table }) {
		return false, nil
	}
	c.DelTable(table)
	if err := c.Flush(); err != nil {
		return false, fmt.Errorf("nftables: delete table inet %s: %w", Table, err)
	}
	e.applied, e.verifiedOK = nil, false
	return true, nil
}

// Close releases the socket Verify keeps open. The table stays.
func (e *Enforcer) Close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.gen == nil {
		return nil
	}
	err := e.gen.c.Close()
	e.gen = nil
	return err
}

// ErrDrift reports that the table in the kernel is not what was applied.
var ErrDrift = errors.New("nftables table differs from what the agent applied")

// Check reads the table back and compares it with rs: chains, the order and
// comments of their rules, and every set element. It returns an error
// wrapping ErrDrift that says what differs.
func (e *Enforcer) Check(rs Ruleset) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.checkMarked(rs)
}

// Verify is the drift check cheap enough to run twice a second on a
// device with ten thousand destinations: it asks for the ruleset
// generation and, while it stands where the last clean comparison left it,
// reads nothing else and allocates next to nothing. When anything in the
// namespace has been committed since (ours, an administrator's, another
// table's), it compares everything, as Check does.
func (e *Enforcer) Verify(rs Ruleset) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.verifiedOK {
		if now, err := e.generation(); err == nil && now == e.verified {
			return nil
		}
	}
	return e.checkMarked(rs)
}

// checkMarked is check that remembers the generation of a clean result.
// The generation is read before comparing: a change made meanwhile
// advances it again, and the next Verify looks.
func (e *Enforcer) checkMarked(rs Ruleset) error {
	gen, genErr := e.generation()
	err := e.check(rs)
	e.verified, e.verifiedOK = gen, err == nil && genErr == nil
	return err
}

// check compares the kernel's table with rs; the caller holds e.mu.
func (e *Enforcer) check(rs Ruleset) error {
	c, err := e.conn()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	have, err := e.current(c)
	if err != nil {
		return err
	}
	if !have.present {
		return fmt.Errorf("%w: table inet %s is missing", ErrDrift, Table)
	}
	byName := map[string]*nftables.Chain{}
	for _, ch := range have.chains {
		byName[ch.Name] = ch
	}
	if len(byName) != len(rs.Chains) {
		return fmt.Errorf("%w: %d chains, want %d", ErrDrift, len(byName), len(rs.Chains))
	}
	for _, want := range rs.Chains {
		ch, ok := byName[want.Name]
		if !ok {
			return fmt.Errorf("%w: chain %s is missing", ErrDrift, want.Name)
		}
		if base := ch.Hooknum != nil; base != (want.Hook != "") {
			return fmt.Errorf("%w: chain %s is a base chain: %v, want %v", ErrDrift, want.Name, base, want.Hook != "")
		}
		if want.Hook != "" && (*ch.Hooknum != *hook(want.Hook) || ch.Policy == nil || *ch.Policy != nftables.ChainPolicyDrop) {
			return fmt.Errorf("%w: chain %s is not on hook %s with policy drop", ErrDrift, want.Name, want.Hook)
		}
		rules, err := c.GetRules(table, ch)
		if err != nil {
			return fmt.Errorf("nftables: list rules: %w", err)
		}
		if len(rules) != len(want.Rules) {
			return fmt.Errorf("%w: chain %s has %d rules, want %d", ErrDrift, want.Name, len(rules), len(want.Rules))
		}
		// Rules are judged by what they do, not by their comments: a
		// rule replaced in place under its old comment ("accept comment
		// \"default drop\"") is drift.
		for i, r := range rules {
			if err := sameRule(r, want.Rules[i], want.Hook); err != nil {
				return fmt.Errorf("%w: chain %s rule %d (%q): %v", ErrDrift, want.Name, i, want.Rules[i].Comment, err)
			}
		}
	}
	if len(have.sets) != len(rs.Sets) {
		return fmt.Errorf("%w: %d sets, want %d", ErrDrift, len(have.sets), len(rs.Sets))
	}
	setByName := map[string]*nftables.Set{}
	for _, s := range have.sets {
		setByName[s.Name] = s
	}
	for _, want := range rs.Sets {
		s, ok := setByName[want.Name]
		if !ok {
			return fmt.Errorf("%w: set %s is missing", ErrDrift, want.Name)
		}
		if s.IsMap != want.Map || s.Interval == want.ByAddress {
			return fmt.Errorf("%w: set %s changed its kind", ErrDrift, want.Name)
		}
		elems, err := c.GetSetElements(s)
		if err != nil {
			return fmt.Errorf("nftables: list set %s: %w", want.Name, err)
		}
		// The kernel lists elements in an order of its own (the order
		// they were added, for interval sets), which is not ours to
		// decide; they are compared as sets, in the model's order. An
		// element the model could not have made is drift, never skipped.
		have := make([]Element, 0, len(elems))
		for _, el := range elems {
			e, err := decodeElement(el, want)
			if err != nil {
				return fmt.Errorf("%w: set %s: %v", ErrDrift, want.Name, err)
			}
			have = append(have, e)
		}
		slices.SortFunc(have, compareElements)
		if !slices.Equal(have, want.Elements) {
			return fmt.Errorf("%w: set %s has %d elements, want %d (or they differ)", ErrDrift, want.Name, len(have), len(want.Elements))
		}
	}
	return nil
}

// sameRule says how a rule read back from the kernel differs from want,
// by its expressions and its comment, or nil. Both are encoded as the
// kernel takes them, with what the kernel adds left out: its counters'
// values, and set ids (sets are named).
func sameRule(got *nftables.Rule, want Rule, hook string) error {
	sets := map[string]*nftables.Set{}
	if want.Lookup != nil {
		sets[want.Lookup.Set] = &nftables.Set{Name: want.Lookup.Set}
	}
	wantExprs, err := want.exprs(hook, sets)
	if err != nil {
		return err
	}
	// google/nftables does not decode byteorder expressions (it skips
	// the types it does not know): those are left out of both sides.
	wantExprs = slices.DeleteFunc(wantExprs, func(e expr.Any) bool { _, ok := e.(*expr.Byteorder); return ok })
	if len(got.Exprs) != len(wantExprs) {
		return fmt.Errorf("%d expressions, want %d", len(got.Exprs), len(wantExprs))
	}
	fam := byte(nftables.TableFamilyINet)
	for i, g := range got.Exprs {
		switch e := g.(type) {
		case *expr.Counter:
			g = &expr.Counter{}
		case *expr.Lookup:
			l := *e
			l.SetID = 0
			g = &l
		}
		a, err := expr.Marshal(fam, g)
		if err != nil {
			return fmt.Errorf("expression %d: %w", i, err)
		}
		b, err := expr.Marshal(fam, wantExprs[i])
		if err != nil {
			return fmt.Errorf("expression %d: %w", i, err)
		}
		if !bytes.Equal(a, b) {
			return fmt.Errorf("expression %d is %T %+v, want %T %+v", i, g, g, wantExprs[i], wantExprs[i])
		}
	}
	if comment, _ := userdata.GetString(got.UserData, userdata.TypeComment); comment != want.Comment {
		return fmt.Errorf("comment %q, want %q", comment, want.Comment)
	}
	return nil
}

func hook(chain string) *nftables.ChainHook {
	switch chain {
	case "input":
		return nftables.ChainHookInput
	case "output":
		return nftables.ChainHookOutput
	}
	return nftables.ChainHookForward
}

func ptr[T any](v T) *T { return &v }

func nfSet(s Set) *nftables.Set {
	addrType := nftables.TypeIPAddr
	if s.V6 {
		addrType = nftables.TypeIP6Addr
	}
	ns := &nftables.Set{
		Table: table, Name: s.Name, Interval: true, Concatenation: true,
		KeyType: nftables.MustConcatSetType(addrType, nftables.TypeInetProto, nftables.TypeInetService),
	}
	if s.ByAddress {
		ns.Interval, ns.Concatenation, ns.KeyType = false, false, addrType
	}
	if s.Map {
		ns.IsMap, ns.DataType = true, nftables.TypeVerdict
	}
	return ns
}

func nfElements(s Set, elements []Element) []nftables.SetElement {
	out := make([]nftables.SetElement, 0, len(elements))
	for _, e := range elements {
		first, last := e.Prefix.Masked().Addr(), lastAddr(e.Prefix)
		el := nftables.SetElement{
			Key:    key(first, e.ProtoFrom, e.PortFrom),
			KeyEnd: key(last, e.ProtoTo, e.PortTo),
		}
		if s.ByAddress { // Build puts only whole single addresses here
			el = nftables.SetElement{Key: first.AsSlice()}
		}
		if s.Map {
			el.VerdictData = &expr.Verdict{Kind: expr.VerdictAccept}
			if e.Chain != "" {
				el.VerdictData = &expr.Verdict{Kind: expr.VerdictJump, Chain: e.Chain}
			}
		}
		out = append(out, el)
	}
	return out
}

// diffLimit is the largest element diff applied to a set in place; a set
// that changes more is made afresh (see applyLocked).
const diffLimit = 64

// diffElements says which elements to add and delete to turn have into
// want. Both are in the model's order (Build sorts them), so one walk
// through both finds the difference without a map.
func diffElements(have, want []Element) (add, del []Element) {
	i, j := 0, 0
	for i < len(have) && j < len(want) {
		switch c := compareElements(have[i], want[j]); {
		case c == 0:
			i, j = i+1, j+1
		case c < 0:
			del, i = append(del, have[i]), i+1
		default:
			add, j = append(add, want[j]), j+1
		}
	}
	return append(add, want[j:]...), append(del, have[i:]...)
}

// key encodes addr . proto . port as the kernel stores a concatenation:
// each field padded to a multiple of four bytes.
func key(a netip.Addr, proto uint8, port uint16) []byte {
	b := a.AsSlice()
	b = append(b, proto, 0, 0, 0)
	b = binary.BigEndian.AppendUint16(b, port)
	return append(b, 0, 0)
}

// decodeElement reads an element back as the model writes them: an
// address prefix with protocol and port ranges, and a map element's
// verdict. Anything else (an address range that is no prefix, a verdict
// the model never uses) is an error.
func decodeElement(el nftables.SetElement, s Set) (Element, error) {
	v6, isMap := s.V6, s.Map
	n := 4
	if v6 {
		n = 16
	}
	if s.ByAddress {
		a, ok := netip.AddrFromSlice(el.Key)
		if !ok || len(el.Key) != n || len(el.KeyEnd) != 0 {
			return Element{}, fmt.Errorf("element key of %d and %d bytes in a set by address", len(el.Key), len(el.KeyEnd))
		}
		el.Key, el.KeyEnd = key(a, 0, 0), key(a, 255, 65535)
	}
	if len(el.Key) != n+8 || len(el.KeyEnd) != n+8 {
		return Element{}, fmt.Errorf("element key of %d and %d bytes", len(el.Key), len(el.KeyEnd))
	}
	first, _ := netip.AddrFromSlice(el.Key[:n])
	last, _ := netip.AddrFromSlice(el.KeyEnd[:n])
	p := widestFrom(first, last)
	if lastAddr(p) != last {
		return Element{}, fmt.Errorf("element %s-%s is not a prefix", first, last)
	}
	e := Element{
		Prefix:    p,
		ProtoFrom: el.Key[n], ProtoTo: el.KeyEnd[n],
		PortFrom: binary.BigEndian.Uint16(el.Key[n+4:]), PortTo: binary.BigEndian.Uint16(el.KeyEnd[n+4:]),
	}
	if !isMap {
		if len(el.Val) != 0 {
			return Element{}, fmt.Errorf("element %s carries data in a plain set", p)
		}
		return e, nil
	}
	chain, err := decodeVerdict(el.Val)
	if err != nil {
		return Element{}, fmt.Errorf("element %s: %w", p, err)
	}
	e.Chain = chain
	return e, nil
}

// decodeVerdict reads a verdict map element's data (NFTA_DATA_VERDICT's
// attributes, as google/nftables hands them over): accept, or a jump and
// its chain.
func decodeVerdict(b []byte) (chain string, err error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return "", fmt.Errorf("verdict: %w", err)
	}
	ad.ByteOrder = binary.BigEndian
	code, haveCode := int32(0), false
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_VERDICT_CODE:
			code, haveCode = int32(ad.Uint32()), true
		case unix.NFTA_VERDICT_CHAIN:
			chain = ad.String()
		}
	}
	if err := ad.Err(); err != nil {
		return "", fmt.Errorf("verdict: %w", err)
	}
	switch {
	case haveCode && code == int32(expr.VerdictAccept) && chain == "":
		return "", nil
	case haveCode && code == int32(expr.VerdictJump) && chain != "":
		return chain, nil
	}
	return "", fmt.Errorf("verdict %d %q is neither accept nor a jump", code, chain)
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

func nfproto(v6 bool) []expr.Any {
	p := byte(unix.NFPROTO_IPV4)
	if v6 {
		p = unix.NFPROTO_IPV6
	}
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

// ctState matches connections in any of the states in mask.
func ctState(mask uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(mask),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}
}

// exprs compiles a rule of a chain on hook (empty: a regular chain) the
// way nft(8) compiles the same text, so that `nft list` shows our rules
// exactly as Text writes them.
func (r Rule) exprs(hook string, sets map[string]*nftables.Set) ([]expr.Any, error) {
	var ex []expr.Any
	if r.Iface != "" {
		key := expr.MetaKeyOIFNAME
		if hook == "input" {
			key = expr.MetaKeyIIFNAME
		}
		name := make([]byte, unix.IFNAMSIZ)
		copy(name, r.Iface)
		ex = append(ex, &expr.Meta{Key: key, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: name})
	}
	if r.InIface != "" {
		name := make([]byte, unix.IFNAMSIZ)
		copy(name, r.InIface)
		ex = append(ex, &expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: name})
	}
	if r.Established {
		ex = append(ex, ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED)...)
	}
	if r.New {
		ex = append(ex, ctState(expr.CtStateBitNEW)...)
	}
	if r.Direction != AnyDirection {
		dir := byte(0) // IP_CT_DIR_ORIGINAL
		if r.Direction == Reply {
			dir = 1 // IP_CT_DIR_REPLY
		}
		ex = append(ex, &expr.Ct{Register: 1, Key: expr.CtKeyDIRECTION}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{dir}})
	}
	switch {
	case r.ND:
		ex = append(ex, nfproto(true)...)
		ex = append(ex,
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_ICMPV6}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
			&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{133}, ToData: []byte{136}})
	case r.DHCP != nil:
		ex = append(ex, nfproto(r.DHCP.V6)...)
		ports := binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(nil, r.DHCP.Src), r.DHCP.Dst)
		ex = append(ex,
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 4},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ports})
	case r.Lookup != nil:
		l := r.Lookup
		set, ok := sets[l.Set]
		if !ok {
			return nil, fmt.Errorf("nftables: rule %q uses unknown set %s", r.Comment, l.Set)
		}
		// Registers as nft allocates them for a concatenation: the address
		// from register 1, then the next free 32-bit slots.
		off, n, protoReg, portReg := uint32(12), uint32(4), uint32(9), uint32(10)
		if l.V6 {
			off, n, protoReg, portReg = 8, 16, 2, 13
		}
		if l.Addr == Dst {
			off += n
		}
		portOff := uint32(0)
		if l.Port == Dst {
			portOff = 2
		}
		ex = append(ex, nfproto(l.V6)...)
		if l.ByAddress {
			ex = append(ex,
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
				&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID, IsDestRegSet: l.Map, DestRegister: 0})
			if l.Map {
				return ex, nil
			}
			break
		}
		ex = append(ex,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: protoReg},
			&expr.Byteorder{SourceRegister: protoReg, DestRegister: protoReg, Op: expr.ByteorderHton, Len: 1, Size: 2},
			&expr.Payload{DestRegister: portReg, Base: expr.PayloadBaseTransportHeader, Offset: portOff, Len: 2},
			&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID, IsDestRegSet: l.Map, DestRegister: 0})
		if l.Map { // the element's verdict is the rule's
			return ex, nil
		}
	}
	if r.DstPort != 0 {
		ex = append(ex,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, r.DstPort)})
	}
	if r.Over != nil {
		ex = append(ex, &expr.Limit{Type: expr.LimitTypePktBytes, Rate: r.Over.PerSecond, Over: true, Unit: expr.LimitTimeSecond, Burst: r.Over.Burst})
	}
	if r.Limit > 0 {
		ex = append(ex, &expr.Limit{Type: expr.LimitTypePkts, Rate: uint64(r.Limit), Unit: expr.LimitTimeSecond, Burst: r.Limit})
	}
	if r.Log != "" {
		ex = append(ex, &expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_PREFIX, Group: LogGroup, Data: []byte(r.Log)}, &expr.Counter{})
	}
	if r.Drop {
		if r.Log == "" {
			ex = append(ex, &expr.Counter{})
		}
		return append(ex, &expr.Verdict{Kind: expr.VerdictDrop}), nil
	}
	return append(ex, &expr.Verdict{Kind: expr.VerdictAccept}), nil
}
