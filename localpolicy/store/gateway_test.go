package store

import (
	"path/filepath"
	"slices"
	"testing"
)

// A gateway's roster and orders survive a restart, in the order taken;
// a newer certificate replaces the one held.
func TestGatewayStateSurvivesARestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	s := open(t, path)
	if st, err := s.Gateway(); err != nil || len(st.Roster)+len(st.Orders) != 0 || st.RosterCursor != 0 {
		t.Fatalf("a fresh cache holds %+v, %v", st, err)
	}
	if err := s.TakeGateway(map[string][]byte{"dev-a": []byte("cert-a1"), "dev-b": []byte("cert-b1")},
		[]GatewayOrder{{Seq: 3, Raw: []byte("order-3")}}, 7, 3); err != nil {
		t.Fatal(err)
	}
	if err := s.TakeGateway(map[string][]byte{"dev-a": []byte("cert-a2")}, []GatewayOrder{{Seq: 12, Raw: []byte("order-12")}}, 9, 12); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = open(t, path)
	st, err := s.Gateway()
	if err != nil {
		t.Fatal(err)
	}
	if string(st.Roster["dev-a"]) != "cert-a2" || string(st.Roster["dev-b"]) != "cert-b1" || len(st.Roster) != 2 {
		t.Errorf("roster %q", st.Roster)
	}
	if !slices.EqualFunc(st.Orders, [][]byte{[]byte("order-3"), []byte("order-12")}, func(a, b []byte) bool { return string(a) == string(b) }) {
		t.Errorf("orders %q, want in the order taken", st.Orders)
	}
	if st.RosterCursor != 9 || st.OrderCursor != 12 {
		t.Errorf("cursors %d, %d; want 9, 12", st.RosterCursor, st.OrderCursor)
	}
}
