"""The simulated validation cases: `data_prep.make_phantom` arguments per case name.

Seeds >= 900000, never used by a training set (dataset seeds derive subject seeds below that).
Shared by `validate_model.py` (the model card's table) and `prior_level.py`.
"""

SIN20, COS20 = 0.3420201, 0.9396926
CASES = {
    "healthy": ["--kind=brain", "--seed=900101"],
    "lesions": ["--kind=brain", "--seed=900102", "--lesions"],
    "oblique20": ["--kind=brain", "--seed=900103", f"--b0_dir={SIN20},0,{COS20}"],
    "shapes": ["--kind=shapes", "--seed=900104"],
    "aniso_1x1x2": ["--kind=brain", "--seed=900105", "--voxel_size_mm=1,1,2"],
}
