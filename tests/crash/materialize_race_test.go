//go:build race

package crash

// matRace: this test binary runs under the race detector.
const matRace = true
