// Package strictjson owns how Bulkhead reads every JSON document it trusts
// (policy files, signed payloads, configuration): exactly one value, no
// unknown or duplicate members, nothing after it, and errors that name the
// offending field by its path so an operator can find it.
package strictjson

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
)

// Errors a caller may test for with errors.Is.
var (
	ErrUnknownField = errors.New("unknown field")
	ErrTrailingData = errors.New("trailing data after the JSON value")
	ErrSyntax       = errors.New("malformed JSON")
)

// Unmarshal decodes data into v. Unknown members, duplicate member names,
// trailing data and type mismatches are errors that name the field's path
// (for example "segments[2].destinations[0].protocol").
//
// Anything but whitespace after the value is a second, unsigned document
// smuggled behind the first: json.Unmarshal refuses it, and the refusal is
// named ErrTrailingData. (Decoding straight from the bytes, not through a
// streaming decoder, is what keeps a 10,000-destination policy within a
// bundle's time budget.)
func Unmarshal(data []byte, v any) error {
	err := json.Unmarshal(data, v, json.RejectUnknownMembers(true))
	if err == nil {
		return nil
	}
	dec := jsontext.NewDecoder(bytes.NewReader(data))
	if _, verr := dec.ReadValue(); verr == nil {
		if _, terr := dec.ReadToken(); terr != io.EOF {
			return &Error{Offset: dec.InputOffset(), Err: fmt.Errorf("%w at byte %d", ErrTrailingData, dec.InputOffset())}
		}
	}
	return describe(err)
}

// Error is a decoding error with the byte offset it was found at.
type Error struct {
	Offset int64
	Err    error
}

func (e *Error) Error() string { return e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

// Line turns an error from Unmarshal into "line L, column C: message" for
// data, when the error knows its offset; otherwise it returns err's text.
func Line(data []byte, err error) string {
	var e *Error
	if !errors.As(err, &e) || e.Offset < 0 || e.Offset > int64(len(data)) {
		return err.Error()
	}
	line, col := 1, 1
	for _, c := range data[:e.Offset] {
		if c == '\n' {
			line, col = line+1, 1
		} else {
			col++
		}
	}
	return fmt.Sprintf("line %d, column %d: %v", line, col, err)
}

func describe(err error) error {
	var offset int64 = -1
	var serr0 *json.SemanticError
	var synerr0 *jsontext.SyntacticError
	switch {
	case errors.As(err, &serr0):
		offset = serr0.ByteOffset
	case errors.As(err, &synerr0):
		offset = synerr0.ByteOffset
	}
	return &Error{Offset: offset, Err: describeErr(err)}
}

func describeErr(err error) error {
	var serr *json.SemanticError
	if errors.As(err, &serr) {
		path := Path(serr.JSONPointer)
		if errors.Is(err, json.ErrUnknownName) {
			return fmt.Errorf("%w %q", ErrUnknownField, path)
		}
		if serr.Err != nil {
			return fmt.Errorf("%s: %v", orRoot(path), serr.Err)
		}
		want := "a valid value"
		if serr.GoType != nil {
			want = friendlyType(serr.GoType.String())
		}
		got := "value"
		if serr.JSONKind != 0 {
			got = serr.JSONKind.String()
		}
		return fmt.Errorf("%s: cannot use JSON %s as %s", orRoot(path), got, want)
	}
	var synerr *jsontext.SyntacticError
	if errors.As(err, &synerr) {
		where := ""
		if p := Path(synerr.JSONPointer); p != "" {
			where = " in " + p
		}
		return fmt.Errorf("%w at byte %d%s: %v", ErrSyntax, synerr.ByteOffset, where, synerr.Err)
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: unexpected end of input", ErrSyntax)
	}
	return fmt.Errorf("%w: %v", ErrSyntax, err)
}

// Path renders a JSON pointer ("/segments/2/name") the way people write
// field paths ("segments[2].name").
func Path(p jsontext.Pointer) string {
	var b strings.Builder
	for tok := range p.Tokens() {
		if isIndex(tok) {
			b.WriteString("[" + tok + "]")
			continue
		}
		if b.Len() > 0 {
			b.WriteByte('.')
		}
		b.WriteString(tok)
	}
	return b.String()
}

func isIndex(tok string) bool {
	if tok == "" {
		return false
	}
	for _, r := range tok {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

func orRoot(path string) string {
	if path == "" {
		return "document"
	}
	return path
}

func friendlyType(goType string) string {
	switch goType {
	case "string":
		return "a string"
	case "bool":
		return "a boolean"
	case "int", "int64", "uint", "uint8", "uint16", "uint32", "uint64":
		return "a whole number (" + goType + ")"
	}
	if strings.HasPrefix(goType, "[]") {
		return "a list"
	}
	if strings.HasPrefix(goType, "map[") {
		return "an object"
	}
	return "the expected type (" + goType + ")"
}
