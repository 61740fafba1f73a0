package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"

	"github.com/spool-csi/spool/pkg/pool"
)

const poolUsage = `Usage: spool pool init NAME=DIR

Initialise a shared pool: write the pool's identity (its name and a new pool
ID) into DIR, which must be empty, and print the pool ID. Run it once, on
one machine, with the share mounted at DIR. Spool never initialises a shared
pool by itself: a node where the share is not mounted must not mistake its
empty mount point for a new pool. Then serve the pool with
--pool NAME=DIR,shared (add ,id=POOLID to check that the right share is
mounted on every start).
`

// Pool runs `spool pool ARGS...` and returns the process exit code.
func Pool(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, poolUsage)
		return exitUsage
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, poolUsage)
		return exitOK
	case "init":
	default:
		fmt.Fprintf(stderr, "spool pool: unknown command %q\n\n%s", args[0], poolUsage)
		return exitUsage
	}
	fset := flag.NewFlagSet("spool pool init", flag.ContinueOnError)
	fset.SetOutput(stderr)
	fset.Usage = func() { fmt.Fprint(stderr, poolUsage) }
	if err := fset.Parse(args[1:]); errors.Is(err, flag.ErrHelp) {
		return exitOK
	} else if err != nil {
		return exitUsage
	}
	if fset.NArg() != 1 {
		fmt.Fprintf(stderr, "spool pool init: want exactly one NAME=DIR\n\n%s", poolUsage)
		return exitUsage
	}
	spec, err := pool.ParseSpec(fset.Arg(0))
	if err != nil {
		fmt.Fprintf(stderr, "spool pool init: %v\n", err)
		return exitUsage
	}
	if spec.Capacity != 0 || spec.Shared || spec.ID != "" {
		fmt.Fprintf(stderr, "spool pool init: give only NAME=DIR; options belong to --pool when serving\n")
		return exitUsage
	}
	id, err := pool.Init(spec.Name, spec.Dir)
	if err != nil {
		fmt.Fprintf(stderr, "spool pool init: %v\n", err)
		return exitError
	}
	fmt.Fprintln(stdout, id)
	fmt.Fprintf(stderr, "Initialised shared pool %s in %s. Serve it with --pool %s=%s,shared,id=%s\n", spec.Name, spec.Dir, spec.Name, spec.Dir, id)
	return exitOK
}
