//go:build !linux

package posture

// Watch has nothing to watch with off Linux: the channel never receives,
// and changes are seen at the next timed sample.
func Watch(w Wants, f *Facts) (changed <-chan string, stop func()) {
	return nil, func() {}
}
