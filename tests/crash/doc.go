// Package crash holds real-process crash tests of the changelog: a child
// process (the test binary re-executed) appends, persists and checkpoints
// while the parent kills it with SIGKILL at random moments, restarts it on
// the same data directory and blob store, and finally checks that no
// acknowledged change was lost or duplicated and that every checkpoint
// restores exactly the state it covers. Everything is in the _test.go files;
// see tests/README.md.
package crash
