package cli

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/spool-csi/spool/driver"
	"github.com/spool-csi/spool/pkg/size"
)

const listUsage = `Usage: spool volume list --pool NAME=DIR[,capacity=SIZE] --node-id NODE [flags]

Lists the volumes of the pools, as the driver's ListVolumes does.

Flags:
`

// Output format of list besides json and handle.
const outTable = "table"

func list(args []string, stdout, stderr io.Writer) error {
	var (
		c      common
		output string
	)
	fl := flag.NewFlagSet("spool volume list", flag.ContinueOnError)
	fl.SetOutput(stderr)
	fl.Usage = func() { fmt.Fprint(stderr, listUsage); fl.PrintDefaults() }
	c.register(fl)
	fl.StringVar(&output, "o", outTable, "output: table, json, or handle (one volume handle a line)")
	fl.StringVar(&output, "output", outTable, "same as -o")
	pos, err := parse(fl, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q", pos[0])
	}
	if err := c.check(); err != nil {
		return err
	}
	if err := oneOf("output", output, outTable, outJSON, outHandle); err != nil {
		return err
	}
	c.readOnly = true
	d, err := c.open()
	if err != nil {
		return err
	}
	defer d.Close()
	vols, err := listAll(context.Background(), d)
	if err != nil {
		return err
	}
	return writeList(stdout, output, vols)
}

// listAll returns every volume of the driver's pools.
func listAll(ctx context.Context, d controller) ([]*csi.ListVolumesResponse_Entry, error) {
	var out []*csi.ListVolumesResponse_Entry
	token := ""
	for {
		r, err := d.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: token})
		if err != nil {
			return nil, message(err)
		}
		out = append(out, r.GetEntries()...)
		if token = r.GetNextToken(); token == "" {
			return out, nil
		}
	}
}

// listEntry is one volume of the -o json output.
type listEntry struct {
	VolumeHandle  string            `json:"volumeHandle"`
	CapacityBytes int64             `json:"capacityBytes"`
	Attributes    map[string]string `json:"volumeAttributes"`
	AttachedTo    []string          `json:"attachedTo"`
}

func writeList(w io.Writer, output string, vols []*csi.ListVolumesResponse_Entry) error {
	switch output {
	case outHandle:
		for _, e := range vols {
			if _, err := fmt.Fprintln(w, e.GetVolume().GetVolumeId()); err != nil {
				return err
			}
		}
		return nil
	case outJSON:
		out := make([]listEntry, 0, len(vols))
		for _, e := range vols {
			v := e.GetVolume()
			out = append(out, listEntry{
				VolumeHandle: v.GetVolumeId(), CapacityBytes: v.GetCapacityBytes(),
				Attributes: v.GetVolumeContext(), AttachedTo: append([]string{}, e.GetStatus().GetPublishedNodeIds()...),
			})
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "VOLUME HANDLE\tCAPACITY\tPROVISIONING\tENCRYPTION\tATTACHED TO")
	for _, e := range vols {
		v := e.GetVolume()
		attached := strings.Join(e.GetStatus().GetPublishedNodeIds(), ",")
		if attached == "" {
			attached = "-"
		}
		enc := v.GetVolumeContext()[driver.ParamEncryption]
		if enc == "" {
			enc = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", v.GetVolumeId(), size.Format(v.GetCapacityBytes()), v.GetVolumeContext()[driver.ParamProvisioning], enc, attached)
	}
	return tw.Flush()
}
