package strictjson

import (
	"errors"
	"strings"
	"testing"
)

type inner struct {
	Name string `json:"name"`
	Port int    `json:"port"`
}

type outer struct {
	Items []inner          `json:"items"`
	ByKey map[string]inner `json:"by_key"`
}

func TestUnmarshal(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		wantErr error  // nil: success
		wantMsg string // substring of the error text
	}{
		{name: "ok", in: `{"items":[{"name":"a","port":1}]}`},
		{name: "trailing whitespace ok", in: "{\"items\":[]}\n\t "},
		{name: "unknown nested", in: `{"items":[{"name":"a","prot":1}]}`, wantErr: ErrUnknownField, wantMsg: `"items[0].prot"`},
		{name: "unknown in map value", in: `{"by_key":{"x":{"nme":"a"}}}`, wantErr: ErrUnknownField, wantMsg: `"by_key.x.nme"`},
		{name: "trailing object", in: `{"items":[]}{"items":[]}`, wantErr: ErrTrailingData},
		{name: "trailing garbage", in: `{"items":[]} x`, wantErr: ErrTrailingData},
		{name: "duplicate member", in: `{"items":[],"items":[]}`, wantErr: ErrSyntax, wantMsg: "duplicate"},
		{name: "case differs", in: `{"Items":[]}`, wantErr: ErrUnknownField, wantMsg: `"Items"`},
		{name: "truncated", in: `{"items":[`, wantErr: ErrSyntax},
		{name: "empty", in: ``, wantErr: ErrSyntax},
		{name: "wrong type", in: `{"items":[{"port":"x"}]}`, wantMsg: "items[0].port"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var v outer
			err := Unmarshal([]byte(tt.in), &v)
			if tt.wantErr == nil && tt.wantMsg == "" {
				if err != nil {
					t.Fatalf("Unmarshal: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Unmarshal(%s) succeeded, want an error", tt.in)
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("error %q is not %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("error %q does not mention %q", err, tt.wantMsg)
			}
		})
	}
}

func TestLine(t *testing.T) {
	data := []byte("{\n  \"items\": [\n    {\"name\": \"a\", \"prot\": 1}\n  ]\n}")
	var v outer
	err := Unmarshal(data, &v)
	if got := Line(data, err); !strings.HasPrefix(got, "line 3, column") || !strings.Contains(got, "items[0].prot") {
		t.Errorf("Line = %q, want line 3 and the field path", got)
	}
}
