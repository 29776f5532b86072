package adminapi

import (
	"bufio"
	"encoding/json"
	"net"
	"path/filepath"
	"strings"
	"testing"
)

// The socket reads requests strictly: what it does not know is an error,
// never a silently ignored field or a default op.
func TestDecodeRequestIsStrict(t *testing.T) {
	for _, tc := range []struct {
		line, err string
	}{
		{`{"op":"status"}`, ""},
		{`{"op":"explain","to":"10.0.0.1:443"}`, ""},
		{`{"op":"statuz"}`, `unknown request "statuz"`},
		{`{"op":"status","bogus":1}`, "bogus"},
		{`{"op":"status"} {"op":"apply"}`, "after"},
		{`{}`, `unknown request ""`},
	} {
		_, err := DecodeRequest([]byte(tc.line))
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%s: %v", tc.line, err)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%s: err %v, want one mentioning %q", tc.line, err, tc.err)
		}
	}
}

// The client turns the agent's refusal into an error carrying its words,
// and hands back what it answered.
func TestClientMapsRefusals(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			line, _ := bufio.NewReader(c).ReadBytes('\n')
			req, err := DecodeRequest(line)
			resp := Response{Status: &Status{Mode: "normal", PolicyVersion: 3}}
			if err != nil || req.Op == OpApply {
				resp = Response{Error: "bundle rejected, previous policy still enforced"}
			}
			json.NewEncoder(c).Encode(resp)
			c.Close()
		}
	}()
	c := Client{Socket: sock}
	if st, err := c.Status(); err != nil || st.PolicyVersion != 3 {
		t.Errorf("Status = %+v, %v", st, err)
	}
	if _, err := c.Apply([]byte("x")); err == nil || !strings.Contains(err.Error(), "previous policy still enforced") {
		t.Errorf("Apply refused: %v", err)
	}
	if _, err := (Client{Socket: filepath.Join(t.TempDir(), "none")}).Status(); err == nil || !strings.Contains(err.Error(), "is `bulkhead run` running") {
		t.Errorf("no agent: %v", err)
	}
}
